"""Finding models offline: local folders, or Hub ids already in the Hugging Face cache (nothing is downloaded).

A model name is a local directory or ``ORG/NAME``; :func:`resolve` turns it into a folder (``local_files_only``)
and says where it looked when it cannot. :func:`weight_files` lists the files a loader reads (shards of an
index file included), for fingerprints.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (HF_HUB_CACHE, HF_HOME, default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def looks_like_hub_id(name: str) -> bool:
    parts = str(name).split("/")
    return len(parts) == 2 and all(parts) and not str(name).startswith((".", "~"))


def resolve(name: str | os.PathLike) -> tuple[Path | None, str]:
    """A model name -> (local directory or None, where it was looked for)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path, f"directory {path}"
    if not looks_like_hub_id(str(name)):
        return None, f"no directory {path}"
    cache = hf_cache_dir()
    where = f"not in the HF cache {cache / ('models--' + str(name).replace('/', '--'))}"
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name), cache_dir=cache, local_files_only=True)), where
    except Exception:
        return None, where


def first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def weight_files(folder: Path, names: Iterable[str]) -> list[Path]:
    """The weight files a loader reads from ``folder`` (shards listed by an index file included)."""
    first = first_existing(folder, names)
    if first is None:
        return []
    if first.name.endswith(".index.json"):
        shards = sorted(set(json.loads(first.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    return [first]


@contextlib.contextmanager
def quiet():
    """Silence diffusers/transformers load reports and progress bars (library code never prints)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars:
            tlog.enable_progress_bar()
