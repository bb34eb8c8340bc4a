"""Mapper / cleaner checkpoint files (``.pt``), and reading a mapper or cleaner from any of its forms.

A mapper or cleaner is given as a schema-1 checkpoint file (this module), a folder in the layout of
:mod:`tdr.pipeline.pretrained` (``config.json`` + ``model.safetensors``) or a Hub repo id of such a folder in
the HF cache. The checkpoint file format (``torch.load(path, weights_only=True)`` reads it)::

    {
        "schema": 1,
        "kind": "mapper" | "cleaner",
        "config": MapperConfig.to_dict() | CleanerConfig.to_dict(),   # dims (+ the UNet's attn2 names/shapes)
        "state_dict": {name: tensor},                                 # Mapper / Cleaner state_dict
        "meta": {...},                                                # free-form JSON-able (training run, step)
    }
"""

from __future__ import annotations

import os
import torch

from ..errors import ModelNotFoundError, TdrError
from .cleaner import Cleaner, CleanerConfig
from .mapper import Mapper, MapperConfig
from .pretrained import load_pretrained, locate

SCHEMA = 1


def module_checkpoint(module: Mapper | Cleaner, meta: dict | None = None) -> dict:
    """A mapper or cleaner as the schema-1 payload of this module's docstring (tensors on the CPU, in their
    dtype), for :func:`tdr.runs.checkpoint.save`."""
    kind = "mapper" if isinstance(module, Mapper) else "cleaner"
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return {"schema": SCHEMA, "kind": kind, "config": module.config.to_dict(), "state_dict": state,
            "meta": dict(meta or {})}


def load_checkpoint(path: str | os.PathLike, kind: str) -> Mapper | Cleaner:
    """Read a mapper or cleaner (on CPU): a checkpoint file (in the dtype it was saved in), a folder of
    :mod:`tdr.pipeline.pretrained` or a Hub id of one in the HF cache."""
    found, where = locate(path)
    if found is None:
        raise ModelNotFoundError(f"The {kind} {path} was not found ({where}).")
    if found.is_dir():
        return load_pretrained(found, kind)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelNotFoundError(f"The {kind} checkpoint {path} does not exist.") from None
    except Exception as e:
        raise TdrError(f"{path} is not a readable {kind} checkpoint ({type(e).__name__}).") from None
    if not isinstance(ckpt, dict) or ckpt.get("schema") != SCHEMA or ckpt.get("kind") != kind:
        got = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise TdrError(f"{path} is not a schema-{SCHEMA} {kind} checkpoint (it holds {got!r}).")
    try:
        if kind == "mapper":
            module: Mapper | Cleaner = Mapper(MapperConfig.from_dict(ckpt["config"]))
        else:
            module = Cleaner(CleanerConfig.from_dict(ckpt["config"]))
        module.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise TdrError(f"The {kind} checkpoint {path} is inconsistent ({type(e).__name__}): save it again.") from None
    return module

