"""Checkpoint files: atomic writes, safe reads, RNG state, schema versions with explicit migrations.

Everything in a checkpoint is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs). Writes go to a temporary file that is then
renamed, so an interrupted save never leaves a truncated file behind.
"""

from __future__ import annotations

import os
import random
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelNotFoundError, SchemaError, TdrError


def save(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Atomically write ``payload`` with ``torch.save``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(dict(payload), tmp)
    os.replace(tmp, path)


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file safely (``weights_only=True``, on the CPU); one clear error if it is missing
    or unreadable."""
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
    if "Unsupported global" in str(exc):
        return ("it holds pickled Python objects beyond plain tensors, which tdr refuses to load (loading them "
                "could run code); re-save it as a plain state dict")
    if zipfile.is_zipfile(path):
        return "it is a damaged or incomplete torch file (truncated or corrupt); use another copy"
    return "it is not a torch checkpoint (corrupt, truncated, or another kind of file)"


class Migrations:
    """The schema versions of one kind of file, and the steps that bring an old one to today's.

    ``@migrations.step(n)`` registers a function ``dict -> dict`` turning schema ``n`` into ``n + 1``;
    :meth:`upgrade` applies the steps from a file's schema to ``current`` in order.
    """

    def __init__(self, kind: str, current: int, oldest: int = 1):
        self.kind, self.current, self.oldest = kind, current, oldest
        self.steps: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}

    def step(self, schema: int):
        def register(fn: Callable[[dict[str, Any]], dict[str, Any]]):
            self.steps[schema] = fn
            return fn
        return register

    def readable(self, schema: Any) -> bool:
        return isinstance(schema, int) and self.oldest <= schema <= self.current

    def upgrade(self, data: Mapping[str, Any], schema: Any, source: str = "") -> dict[str, Any]:
        """``data`` (saved as ``schema``) in today's terms; an unknown or newer schema is a SchemaError."""
        if not self.readable(schema):
            where = f"{source} is" if source else "this file is"
            raise SchemaError(f"{where} a {self.kind} of schema {schema!r}; this tdr reads schemas {self.oldest} to "
                              f"{self.current}: use the tdr version that wrote it.")
        out = dict(data)
        for n in range(schema, self.current):
            out = self.steps[n](out)
        return out


# -- RNG state as plain values ------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python ``random``, numpy's global generator, torch (CPU and every CUDA device), as tensors and plain
    values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"python": _lists(random.getstate()), "torch": torch.get_rng_state(),
                             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                       float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved; generators an older checkpoint did not save are left as they are."""
    torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(_tuples(state["python"]))
    if "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _lists(x):
    return [_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
