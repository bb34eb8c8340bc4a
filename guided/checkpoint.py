"""tdr run checkpoints: ``{"schema": 2, "config", "step", "model", "optimizer", "scheduler", "rng", "ema"}``.

Schemas: 1 — before the searches were reworked: ``search`` "prior" or "global" (the paper's search, now
named "masa"), ``match``/``transfer`` missing in the oldest runs (encoder features, patches); 2 — search
"global" is the content search, "masa" the paper's. :func:`migrate` brings a schema-1 config to schema 2.

Everything in a checkpoint is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs). Writes are atomic (temporary file, then rename),
so an interrupted save never leaves a truncated ``last.pt``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import ModelNotFoundError, TdrError
from .aggregation import AggregationConfig

SCHEMA = 2
SCHEMAS = (1, 2)  # readable: older ones go through migrate()


def build_model(backbone: str, *, guided: bool, fuse: str = "enc+dec", search: str | None = None,
                layout: str | None = None, match: str | None = None, transfer: str | None = None) -> torch.nn.Module:
    """A backbone from the registry, guided (with dynamic aggregation) or plain; aggregation settings not
    given keep ``AggregationConfig``'s defaults."""
    from .backbones import build_backbone

    given = dict(search=search, layout=layout, match_features=match, transfer=transfer)
    agg = AggregationConfig(**{k: v for k, v in given.items() if v is not None})
    return build_backbone(backbone, guided=guided, fuse=fuse, aggregation=agg)


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file safely (``weights_only=True``); a clear error if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"Checkpoint {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled code, truncated file, not a torch file
        raise TdrError(f"Cannot read checkpoint {path}: {_why_unreadable(path, exc)}.") from None


def _why_unreadable(path: Path, exc: BaseException) -> str:
    """What is wrong with a checkpoint torch could not load safely, in words (never torch's advice to
    retry with ``weights_only=False``: for a corrupt file that is wrong, and for any file it runs code)."""
    text = str(exc)
    if "Unsupported global" in text:
        return ("it holds pickled Python objects beyond plain tensors, which tdr refuses to load (loading them "
                "could run code); re-save it as a plain state dict")
    import zipfile

    if zipfile.is_zipfile(path):
        return "it is a damaged or incomplete torch file (truncated or corrupt); use another copy"
    return "it is not a torch checkpoint (corrupt, truncated, or another kind of file)"


def save(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Atomically write ``payload`` with ``torch.save``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(dict(payload), tmp)
    os.replace(tmp, path)


def is_run_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    return isinstance(ckpt, Mapping) and ckpt.get("schema") in SCHEMAS and "config" in ckpt and "model" in ckpt


def migrate(config: Mapping[str, Any], schema: int) -> dict[str, Any]:
    """A run's saved config in today's terms (schema ``SCHEMA``), from the schema it was saved with."""
    cfg = dict(config)
    if schema == 1:
        cfg["search"] = {"global": "masa"}.get(cfg.get("search", "prior"), cfg.get("search", "prior"))
        cfg.setdefault("match", "encoder")
        cfg.setdefault("transfer", "patch")
    return cfg


# -- RNG state as plain values ------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """torch (CPU, every CUDA device) and Python ``random`` state, as tensors and plain values."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _plain(x):
    return [_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x
