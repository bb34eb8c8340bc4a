"""Mapper and cleaner shared like any model: a folder in diffusers' ``save_pretrained`` style, or a Hub repo.

Folder layout (what ``tdr train-mapper`` / ``train-cleaner`` write to ``RUN/pretrained/`` when they finish,
and what a Hub repo holds)::

    config.json          {"_class_name": "Mapper" | "Cleaner", "tdr_schema": 1, "kind": "mapper" | "cleaner",
                          ...MapperConfig / CleanerConfig fields..., "meta": {...}}
    model.safetensors    the module's state_dict (fp32)

``--mapper`` / ``--cleaner`` take such a folder, a Hub repo id already in the Hugging Face cache
(``huggingface-cli download ORG/NAME`` once; nothing is downloaded by tdr), or a schema-1 ``.pt`` checkpoint
(:mod:`tdr.pipeline.checkpoint`). Upload a folder with ``huggingface-cli upload ORG/NAME RUN/pretrained``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from ..errors import ModelNotFoundError, TdrError
from .cleaner import Cleaner, CleanerConfig
from .hub import resolve
from .mapper import Mapper, MapperConfig

SCHEMA = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
_CLASSES = {"mapper": (Mapper, MapperConfig), "cleaner": (Cleaner, CleanerConfig)}


def save_pretrained(module: Mapper | Cleaner, folder: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write ``module`` as ``folder/config.json`` + ``folder/model.safetensors``; returns the folder."""
    from safetensors.torch import save_file

    kind = "mapper" if isinstance(module, Mapper) else "cleaner"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": type(module).__name__, "tdr_schema": SCHEMA, "kind": kind,
              **module.config.to_dict(), "meta": dict(meta or {})}
    state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps(config, indent=1))
    return folder


def load_pretrained(folder: str | os.PathLike, kind: str) -> Mapper | Cleaner:
    """Read a mapper or cleaner folder (on CPU, fp32)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ModelNotFoundError(f"The {kind} folder {folder} lacks {CONFIG} or {WEIGHTS}; "
                                 f"pass the folder that 'tdr train-{kind}' writes to RUN/pretrained/.")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except ValueError:
        raise TdrError(f"{folder / CONFIG} is not valid JSON.") from None
    if config.get("tdr_schema") != SCHEMA or config.get("kind") != kind:
        raise TdrError(f"{folder} is not a schema-{SCHEMA} {kind} folder (it holds {config.get('kind')!r}).")
    cls, config_cls = _CLASSES[kind]
    fields = {k: v for k, v in config.items() if k not in ("_class_name", "tdr_schema", "kind", "meta")}
    try:
        module: nn.Module = cls(config_cls.from_dict(fields))
        module.load_state_dict(load_file(str(folder / WEIGHTS)))
    except Exception as e:
        raise TdrError(f"The {kind} folder {folder} is inconsistent ({type(e).__name__}): save it again.") from None
    return module


def locate(name: str | os.PathLike) -> tuple[Path | None, str]:
    """A ``--mapper`` / ``--cleaner`` value -> (a ``.pt`` file or a folder, or None; where it was looked for):
    a file as it is, else a local folder or an offline Hub id, found like every other model."""
    path = Path(name).expanduser()
    if path.is_file():
        return path, str(path)
    if str(name).endswith(".pt"):
        return None, f"no such file {path}"
    return resolve(name)

