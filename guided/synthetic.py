"""Aligned-content guidance: a stand-in for generated guidance whose geometry is known.

The clean image after a random similarity transform (shift ≤ ``shift`` px, scale 1 ± 4%) and a colour
jitter, laid out like "center" guidance (centre square resized to 512²). It carries the clean content a
good guidance image would, misplaced by a known amount, so benchmarks and the demo can measure both
restoration gains and whether matching finds the true place (SPEC §7).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..cache import open_store
from ..cache.transfer import import_guidance
from .data import layout_square


def aligned_content(gt: np.ndarray, rng: np.random.Generator, shift: float) -> tuple[np.ndarray, dict]:
    """Clean frame moved by A(q) = s·(q − c) + c + d (content at q appears at A(q)), colour-jittered,
    then laid out as "center" guidance (512²). Returns (guidance uint8, {"s", "dy", "dx"})."""
    h, w = gt.shape[:2]
    s = float(rng.uniform(0.96, 1.04))
    dy, dx = (float(v) for v in rng.uniform(-shift, shift, 2))
    c = np.array([(h - 1) / 2, (w - 1) / 2])
    # output pixel p samples input q = A⁻¹(p) = (p − c − d)/s + c  (scipy: q = M·p + offset)
    offset = c - (c + np.array([dy, dx])) / s
    moved = np.stack([ndimage.affine_transform(gt[..., k].astype(np.float32), np.eye(2) / s, offset=offset,
                                               order=1, mode="reflect") for k in range(3)], -1)
    gain, bias = rng.uniform(0.9, 1.1, 3), rng.uniform(-8, 8, 3)
    moved = np.clip(moved * gain + bias, 0, 255).round().astype(np.uint8)
    return layout_square(moved, 512, "center"), {"s": s, "dy": dy, "dx": dx}


def make_guidance(url: str, folder: Path, shift: float = 12.0, seed: int = 0, *, force: bool = False) -> dict:
    """Write aligned-content guidance for every image of every split into the store at ``url`` (through
    PNG files in ``folder``, as a user's imported guidance would come); returns each image's true
    transform {"s", "dy", "dx"} by image id."""
    store = open_store(url, "a")
    truth = {}
    for split in ("train", "test"):
        sp = store[split]
        rng = np.random.default_rng([seed, split == "test"])
        out = folder / split
        out.mkdir(parents=True, exist_ok=True)
        for i, image_id in enumerate(sp.ids):
            guide, t = aligned_content(sp.read_gt(i), rng, shift)
            Image.fromarray(guide).save(out / f"{image_id.replace('/', '_')}.png")
            truth[image_id] = t
        import_guidance(store, split, out, force=force)
    return truth
