"""Full-image evaluation of a trained restorer on a store split (``tdr eval``).

1. load the run checkpoint (EMA weights if it has them) and rebuild its backbone from the saved config;
2. for each image: the degraded frame, its guidance (as the run was trained: cached, the degraded image
   laid out like guidance, or none) and the guidance box of the whole frame;
3. restore it whole, or in overlapping tiles (averaged) when ``tile`` is set; backbones pad internally;
4. score it by the store's metric convention (``store.metric``); optionally write side-by-side grids.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ..cache import open_store
from ..errors import CheckpointError, OutputPathError, StoreError
from ..cache.images import to_float_chw, to_uint8
from ..cache.ingest import min_side
from .aggregation import guidance_box
from ..runs.checkpoint import load
from ..runs.config import from_dict
from .backbones import build_backbone, load_backbone_checkpoint
from .checkpoint import is_run_checkpoint, run_config
from .config import EvalConfig, TrainConfig, resolve_search
from .data import layout_square
from .metrics import MetricAverager, MetricConvention, psnr

Progress = Callable[[dict], None]


@dataclass
class EvalResult:
    """Mean metrics, one row per image, and where the grids went."""

    psnr: float
    ssim: float
    n: int
    rows: list[dict[str, Any]]
    input_psnr: float  # the degraded inputs' PSNR, same convention
    metric: dict[str, Any]
    split: str
    checkpoint: str
    guidance: str
    grids: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"psnr": self.psnr, "ssim": self.ssim, "n": self.n, "input_psnr": self.input_psnr,
                "split": self.split, "checkpoint": self.checkpoint, "guidance": self.guidance,
                "metric": self.metric, "seconds": self.seconds, "grids": self.grids, "rows": self.rows}


# -- inference ----------------------------------------------------------------------------------------
def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


@torch.no_grad()
def restore(model: torch.nn.Module, lq: torch.Tensor, guidance: torch.Tensor | None = None, *,
            layout: str = "center", frame_hw: tuple[int, int] | None = None, crop_yx: tuple[int, int] = (0, 0),
            tile: int = 0, overlap: int = 32) -> torch.Tensor:
    """Restore ``lq`` (1,3,H,W) in [0,1] → (1,3,H,W) in [0,1].

    ``guidance`` (1,3,S,S) shows the ``layout`` rectangle of the frame ``frame_hw`` (default: lq is the
    whole frame) of which ``lq`` is the crop at ``crop_yx``. With ``tile`` > 0 the image is restored in
    tile×tile pieces overlapping by ``overlap`` px, each with its own guidance box; overlaps are averaged.
    """
    H, W = lq.shape[-2:]
    frame_hw = frame_hw or (H, W)
    guided = guidance is not None and getattr(model, "guided", True)

    def run(top: int, left: int, h: int, w: int) -> torch.Tensor:
        x = lq[..., top:top + h, left:left + w]
        if not guided:
            return model(x)
        box = guidance_box(layout, frame_hw, crop_yx=(crop_yx[0] + top, crop_yx[1] + left), device=lq.device)
        return model(x, guidance, box=box)

    if not tile or (H <= tile and W <= tile):
        return run(0, 0, H, W).float().clamp(0, 1)
    acc = torch.zeros(1, 3, H, W, device=lq.device)
    count = torch.zeros(1, 1, H, W, device=lq.device)
    th, tw = min(tile, H), min(tile, W)
    for top in _tile_starts(H, th, overlap):
        for left in _tile_starts(W, tw, overlap):
            acc[..., top:top + th, left:left + tw] += run(top, left, th, tw).float()
            count[..., top:top + th, left:left + tw] += 1
    return (acc / count).clamp(0, 1)


def to_tensor(img: np.ndarray, device=None) -> torch.Tensor:
    """(H,W,3) uint8/uint16 → (1,3,H,W) float32 in [0,1]."""
    return to_float_chw(img)[None].to(device)


def metric_convention(metric: dict[str, Any]) -> MetricConvention:
    """The store's convention (keys unknown to ``MetricConvention`` are dropped)."""
    known = {f.name for f in fields(MetricConvention)}
    return MetricConvention.from_dict({k: v for k, v in metric.items() if k in known})


class GuidanceSource:
    """Guidance images of one split as a run was trained: "cache", "degraded" or "none"."""

    def __init__(self, store, split: str, mode: str, group: str | None = None, *, size: int = 512):
        self.mode, self.split, self.size = mode, split, size
        self.layout = "center"
        self.gs = None
        if mode == "cache":
            gs = store.guidance(group)
            if not gs.done(split, check=False).all():
                raise StoreError(f"Split '{split}' of {store.url} has no guidance for every image yet; finish "
                                 "'tdr generate-guidance' for it.")
            self.gs, self.layout = gs, gs.layout

    def read(self, i: int, lq: np.ndarray) -> np.ndarray | None:
        """(S,S,3) uint8 for image ``i`` (``lq`` its degraded frame), or None."""
        if self.mode == "cache":
            return self.gs.read(self.split, i)
        if self.mode == "degraded":
            return layout_square(lq, self.size, "center")
        return None


# -- loading ------------------------------------------------------------------------------------------
def load_run(path: str | Path, *, use_ema: bool = True, device=None,
             backbone: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Model (eval mode) and saved training config (today's schema, as a dict) of a tdr run checkpoint of
    any schema this version reads; or, with ``backbone``, a plain backbone with official weights loaded
    strictly (config: unguided, nothing else known)."""
    ckpt = load(path)
    if not is_run_checkpoint(ckpt):
        if backbone is None:
            raise CheckpointError(f"{path} is not a tdr training checkpoint; to score official weights, name "
                                  "their backbone (backbone, e.g. nafnet).", param="backbone")
        model = build_backbone(backbone, guided=False)  # an unknown name: UnknownBackboneError, with the choices
        load_backbone_checkpoint(model, ckpt)
        return model.to(device).eval(), {"backbone": backbone, "guidance": "none", "group": None}
    config = from_dict(TrainConfig, run_config(ckpt, str(path)), source=str(path))
    model = build_backbone(config.backbone, guided=config.guidance != "none", aggregation=config.aggregation)
    state = ckpt["ema"] if use_ema and ckpt.get("ema") else ckpt["model"]
    model.load_state_dict(state)
    return model.to(device).eval(), config.to_dict()


# -- grids --------------------------------------------------------------------------------------------
GRID_LABEL_HEIGHT = 14  # px of the strip above each grid panel holding its name


def grid_panels(guided: bool, has_clean: bool = True) -> list[str]:
    """Names of a grid's panels, left to right, as :func:`grid_image` labels them."""
    return ["degraded", *(["guidance"] if guided else []), "restored", *(["clean"] if has_clean else [])]


def grid_image(lq: np.ndarray, guidance: np.ndarray | None, restored: np.ndarray, gt: np.ndarray | None,
               gap: int = 4) -> np.ndarray:
    """degraded | guidance (resized to the frame height) | restored | clean, each panel named in a white
    strip above it (panels that do not exist, e.g. guidance of an unguided run, are left out),
    (GRID_LABEL_HEIGHT + H, ·, 3) uint8."""
    from PIL import ImageDraw

    h = lq.shape[0]
    panels = [to_uint8(lq)]
    if guidance is not None:
        gw = max(1, round(h * guidance.shape[1] / guidance.shape[0]))
        panels.append(np.asarray(Image.fromarray(guidance).resize((gw, h), Image.Resampling.BICUBIC)))
    panels.append(restored)
    if gt is not None:
        panels.append(to_uint8(gt))
    names = grid_panels(guidance is not None, gt is not None)
    white = np.full((h, gap, 3), 255, np.uint8)
    parts = []
    for p in panels:
        parts += [p, white]
    body = np.concatenate(parts[:-1], axis=1)
    canvas = Image.new("RGB", (body.shape[1], GRID_LABEL_HEIGHT + h), "white")
    canvas.paste(Image.fromarray(body), (0, GRID_LABEL_HEIGHT))
    draw, x = ImageDraw.Draw(canvas), 0
    for name, p in zip(names, panels):
        draw.text((x + 2, 1), name, fill=(0, 0, 0))
        x += p.shape[1] + gap
    return np.asarray(canvas)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# -- the evaluation ---------------------------------------------------------------------------------
def evaluate(config: EvalConfig, progress: Progress | None = None) -> EvalResult:
    """Score a run checkpoint on ``config.split`` of ``config.store``; see the module docstring. With
    ``config.json`` set, the result (``EvalResult.to_dict()``) is also written there as JSON."""
    t0 = time.perf_counter()
    if config.json:
        check_output_file(Path(config.json), "json")  # before the evaluation, not after it
    if config.grids:
        check_output_dir(Path(config.out) if config.out else Path(config.checkpoint).parent, "out")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    store = open_store(config.store)
    if config.dataset and store.dataset != config.dataset:
        raise StoreError(f"Store {config.store} holds dataset '{store.dataset}', not '{config.dataset}'.")
    if config.split not in store.splits:
        raise StoreError(f"Store {config.store} has no split '{config.split}' (it has: {', '.join(store.splits)}).")
    sp = store[config.split]
    if not sp.has_gt:
        raise StoreError(f"Split '{config.split}' has no clean images to score against.")
    model, run_cfg = load_run(config.checkpoint, use_ema=config.use_ema, device=device, backbone=config.backbone)
    group = config.group or (run_cfg.get("group") if run_cfg.get("group") in store.guidance_ids() else None)
    source = GuidanceSource(store, config.split, run_cfg["guidance"], group)
    if source.gs is not None:  # a run trained on aligned guidance with the prior search, scored on other guidance
        resolve_search(run_cfg["aggregation"]["search"], source.gs.provenance, source.gs.id)
    conv = metric_convention(store.metric)
    data_range = 65535 if sp.dtype == np.uint16 else None
    out_dir = Path(config.out) if config.out else Path(config.checkpoint).parent / f"eval-{config.split}"
    n = min(len(sp), config.limit) if config.limit else len(sp)
    need = min_side(store.metric)
    small = [i for i in range(n) if min(sp.lq_size(i)) < need]
    if small:
        h, w = sp.lq_size(small[0])
        raise StoreError(f"Image '{sp.ids[small[0]]}' of split '{config.split}' is {w}×{h} pixels; SSIM and the "
                         f"border crop need at least {need}×{need}: re-ingest without such images.")
    avg, inputs, grids = MetricAverager(), [], []
    kw = dict(crop_border=conv.crop_border, y_channel=conv.y_channel, data_range=data_range)
    for i in range(n):
        lq, gt = sp.read_lq(i), sp.read_gt(i)
        guide = source.read(i, lq)
        g = to_tensor(guide, device) if guide is not None else None
        pred = restore(model, to_tensor(lq, device), g, layout=source.layout, tile=config.tile,
                       overlap=config.overlap)[0].cpu()
        avg.add(sp.ids[i], conv.compute(pred, _chw(gt), data_range=data_range))
        inputs.append(psnr(_chw(lq), _chw(gt), **kw))
        if i < config.grids:
            out_dir.mkdir(parents=True, exist_ok=True)
            restored = (pred.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
            path = out_dir / f"{i:04d}-{_safe(sp.ids[i])}.png"
            Image.fromarray(grid_image(lq, guide, restored, gt)).save(path)
            grids.append(str(path))
        if progress:
            progress({"event": "image", "done": i + 1, "total": n, "name": sp.ids[i], **avg.rows[-1]})
    mean = avg.mean()
    rows = [dict(r, input_psnr=p) for r, p in zip(avg.rows, inputs)]
    result = EvalResult(psnr=mean.get("psnr", float("nan")), ssim=mean.get("ssim", float("nan")), n=n, rows=rows,
                        input_psnr=float(np.mean(inputs)) if inputs else float("nan"), metric=conv.to_dict(),
                        split=config.split, checkpoint=str(config.checkpoint), guidance=run_cfg["guidance"],
                        grids=grids, seconds=time.perf_counter() - t0)
    if config.json:
        Path(config.json).parent.mkdir(parents=True, exist_ok=True)
        Path(config.json).write_text(json.dumps(result.to_dict(), indent=1))
    return result


def check_output_dir(path: Path, param: str) -> None:
    """``path`` (the value of parameter ``param``) is a folder, or can be made one under a writable
    parent; else one clear error naming ``param``."""
    path, name = Path(path), param.lstrip("-")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{name} {path} is a file, not a folder; choose a folder.", param=name)
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{name} {path}: cannot create or write in {parent}; choose a writable folder.",
                              param=name)


def check_output_file(path: Path, param: str) -> None:
    """``path`` can be written as a file: not a folder, its folder exists or can be made, writable."""
    path, name = Path(path), param.lstrip("-")
    if path.is_dir():
        raise OutputPathError(f"{name} {path} is a folder; give a file name, e.g. {path / 'metrics.json'}.",
                              param=name)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{name} {path} exists and is not writable.", param=name)
    check_output_dir(path.parent, name)


def _chw(img: np.ndarray) -> torch.Tensor:
    """(H,W,3) uint array → (3,H,W) tensor of the same dtype (the metrics' channel-first torch form)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
