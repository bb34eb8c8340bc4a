"""tdr run checkpoints: ``{"schema": 4, "config", "step", "model", "optimizer", "scheduler", "rng", "ema"}``.

Schemas of the saved config (:data:`RUN_CONFIG` brings an older one to today's, step by step):

1. before the searches were reworked: ``search`` "prior" or "global" (the paper's search, now named
   "masa"), ``match``/``transfer`` missing in the oldest runs (encoder features, patches);
2. search "global" is the content search, "masa" the paper's; the aggregation settings flat in the run
   config (``fuse``, ``search``, ``match``, ``transfer``);
3. the aggregation settings nested as ``aggregation`` (an :class:`AggregationConfig`, ``match`` named
   ``match_features``), ``auto_search`` beside them;
4. the mutual test on by default (``aggregation.mutual``, ``mutual_fill``, ``mutual_trust``; ``[]`` for off): runs of
   earlier schemas were trained without it, or with exactly the parts they saved.

Files are written and read by :mod:`tdr.runs.checkpoint` (atomic, ``weights_only``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..errors import TdrError
from ..runs.checkpoint import Migrations, load

SCHEMA = 4
RUN_CONFIG = Migrations("tdr run checkpoint", current=SCHEMA)


@RUN_CONFIG.step(1)
def _searches_renamed(cfg: dict[str, Any]) -> dict[str, Any]:
    search = cfg.get("search", "prior")
    return {**cfg, "search": {"global": "masa"}.get(search, search), "match": cfg.get("match", "encoder"),
            "transfer": cfg.get("transfer", "patch")}


@RUN_CONFIG.step(2)
def _aggregation_nested(cfg: dict[str, Any]) -> dict[str, Any]:
    flat = {"fuse": "fuse", "search": "search", "match": "match_features", "transfer": "transfer"}
    out = {k: v for k, v in cfg.items() if k not in flat}
    out["aggregation"] = {new: cfg[old] for old, new in flat.items() if old in cfg}
    out["auto_search"] = False  # a saved search is the one the run resolved and used
    return out


@RUN_CONFIG.step(3)
def _mutual_explicit(cfg: dict[str, Any]) -> dict[str, Any]:
    agg = dict(cfg.get("aggregation") or {})
    for key in ("mutual", "mutual_trust", "mutual_fill"):  # absent or null: the run ran without it
        if agg.get(key) is None:
            agg[key] = []
    return {**cfg, "aggregation": agg}


def is_run_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    """A tdr run checkpoint of any schema (readable or not), as opposed to official plain weights."""
    return isinstance(ckpt, Mapping) and "schema" in ckpt and "config" in ckpt and "model" in ckpt


def run_config(ckpt: Mapping[str, Any], source: str = "") -> dict[str, Any]:
    """A run checkpoint's saved config in today's terms; an unknown schema is one SchemaError naming it."""
    return RUN_CONFIG.upgrade(ckpt["config"], ckpt["schema"], source)


def saved_config(path: str | Path) -> dict[str, Any] | None:
    """The config of the run checkpoint ``path`` in today's terms, or None when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    ckpt = load(path)
    if not is_run_checkpoint(ckpt):
        raise TdrError(f"{path} is not a tdr training checkpoint; resume the run from its own folder (out).")
    return run_config(ckpt, str(path))
