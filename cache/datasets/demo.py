"""``demo``: a small synthetic paired dataset made from scikit-image's bundled photographs (no download).

48 train and 12 test pairs, 192–320 px a side in varied aspect ratios, each a crop of a photo with one
synthetic degradation in turn: motion blur (linear kernel), haze (atmospheric scattering
I = J·t + A·(1 − t), t = exp(−β·d), Koschmieder / McCartney), rain streaks (screen-blended), Gaussian noise
(σ 15–50). Everything derives from fixed seeds, so two builds are bit-identical. ``pairs(None, split)`` renders
lazily in memory; ``build(root)`` writes the ``folder`` layout ``ROOT/{train,test}/{lq,gt}/0003-blur.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..images import write_png
from .base import Dataset, Scan
from .refs import ImageRef, Pair
from .synth import Synth, photo

SEED = 20240617
COUNTS = {"train": 48, "test": 12}
DEGRADATIONS = ("blur", "haze", "rain", "noise")
# skimage.data images bundled with the package (no pooch download); the last two are grey
PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
    "hubble_deep_field", "retina", "stereo_motorcycle", "camera", "coins",
)
SIDE = (192, 320)  # output side range, pixels


def specs(split: str) -> list[tuple[str, Synth, Synth]]:
    """(id, lq spec, gt spec) for every pair of ``split``, drawn from the fixed seed (no pixels touched)."""
    rng = np.random.default_rng([SEED, list(COUNTS).index(split)])
    out = []
    for i in range(COUNTS[split]):
        degradation = DEGRADATIONS[i % len(DEGRADATIONS)]
        name = PHOTOS[(3 * i + 7 * (split == "test")) % len(PHOTOS)]
        height, width = (int(v) for v in rng.integers(SIDE[0], SIDE[1] + 1, size=2))
        photo_h, photo_w = photo(name).shape[:2]
        scale = min(photo_h / height, photo_w / width) * rng.uniform(0.45, 1.0)
        box_h, box_w = min(photo_h, round(height * scale)), min(photo_w, round(width * scale))
        top, left = int(rng.integers(0, photo_h - box_h + 1)), int(rng.integers(0, photo_w - box_w + 1))
        params = _draw_params(degradation, rng)
        seed = int(rng.integers(2**31))
        box, size = (top, left, box_h, box_w), (height, width)
        pair_id = f"{split}/{i:04d}-{degradation}"
        out.append((pair_id, Synth(name, box, size, degradation, params, seed), Synth(name, box, size, "none")))
    return out


def _draw_params(degradation: str, rng: np.random.Generator) -> tuple[tuple[str, float], ...]:
    if degradation == "blur":
        values = {"length": rng.uniform(7, 21), "angle": rng.uniform(0, np.pi)}
    elif degradation == "haze":
        values = {"beta": rng.uniform(0.4, 1.2), "airlight": rng.uniform(0.75, 0.95), "tint": rng.uniform(-0.04, 0.04)}
    elif degradation == "rain":
        values = {
            "density": rng.uniform(0.004, 0.012), "length": rng.uniform(12, 30),
            "angle": rng.uniform(-0.35, 0.35), "brightness": rng.uniform(0.5, 0.9),
        }
    else:
        values = {"sigma": rng.uniform(15, 50)}
    return tuple((key, round(float(value), 4)) for key, value in values.items())


@dataclass(frozen=True, kw_only=True)
class Demo(Dataset):
    """The built-in demo set; needs no root (any root given is ignored)."""

    def _root(self, root) -> Path:
        return Path(".")

    def _scan(self, root: Path, split: str) -> Scan:
        scan = Scan()
        for pair_id, lq, gt in specs(split):
            lq_ref = ImageRef(key=f"demo/{pair_id}/lq", synth=lq)
            gt_ref = ImageRef(key=f"demo/{pair_id}/gt", synth=gt)
            scan.pairs.append(Pair(pair_id, lq_ref, gt_ref, gt_ref.key, lq.degradation))
        return scan


DEMO = Demo(
    name="demo",
    title="the built-in demo set",
    degradation="mixed",
    splits=("train", "test"),
    needs_root=False,
    expected_counts=dict(COUNTS),
    layout="""\
no download: made from scikit-image's bundled photos (fixed seeds, bit-identical every time)
48 train / 12 test pairs, 192-320 px, each with one of: motion blur, haze, rain streaks, Gaussian noise
ids like train/0003-blur; `demo.build(DIR)` writes DIR/{train,test}/{lq,gt}/0003-blur.png (the folder layout)""",
)


def build(root: str | Path, progress=None) -> dict[str, int]:
    """Write the demo set as the ``folder`` layout under ``root`` plus ``demo.json`` (each pair's
    degradation and parameters); returns pairs written per split. ``progress(done, total)`` is optional."""
    root = Path(root)
    total, done, record = sum(COUNTS.values()), 0, {}
    for split in COUNTS:
        for pair in DEMO.pairs(None, split):
            name = pair.id.split("/", 1)[1]
            write_png(root / split / "lq" / f"{name}.png", pair.lq.load())
            write_png(root / split / "gt" / f"{name}.png", pair.gt.load())
            spec = pair.lq.synth
            record[pair.id] = {"photo": spec.photo, "box": list(spec.box), "degradation": spec.degradation,
                               "params": dict(spec.params), "seed": spec.seed}
            done += 1
            if progress is not None:
                progress(done, total)
    (root / "demo.json").write_text(json.dumps({"seed": SEED, "pairs": record}, indent=1))
    return dict(COUNTS)
