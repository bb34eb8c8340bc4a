"""What a trained guided run takes from its guidance: its test PSNR with the guidance altered.

A run trained on a cache group is scored on the first ``--images`` images of a split with its own guidance
and with each alteration of it, side by side in one run (no training):

- ``blur4`` / ``blur16``: Gaussian blur σ 4 / 16 guidance pixels — texture gone, colour and layout kept;
- ``shuffle``: cut into 4×4 blocks, the blocks shuffled — layout gone, local texture and colour kept;
- ``colour``: one constant colour, the guidance's mean — nothing but the scene's colour;
- ``other``: the guidance of the next image in the split — the right kind of guidance, the wrong scene.

A model that reads textures loses much of its gain to ``blur16``; one that reads the scene's colour and
tone keeps most of it even with ``colour``. ``other`` is what guidance that does not show the scene costs.

    python bench/guidance_probe.py --run runs/views/last.pt --store demo.zarr
    python bench/guidance_probe.py --run RUN --store STORE --split test --images 12 --only blur16,colour
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image, ImageFilter

from tdr.cache import open_store
from tdr.errors import TdrError
from tdr.guided.evaluate import GuidanceSource, load_run, metric_convention, restore, to_tensor


def blurred(img: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma)))


def shuffled(img: np.ndarray, k: int = 4, seed: int = 0) -> np.ndarray:
    """``img`` cut into k×k blocks (the remainder at the bottom/right dropped), put back in a random order."""
    h, w = img.shape[0] // k, img.shape[1] // k
    blocks = [img[i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(k) for j in range(k)]
    order = np.random.default_rng(seed).permutation(len(blocks))
    return np.concatenate([np.concatenate([blocks[order[i * k + j]] for j in range(k)], 1) for i in range(k)], 0)


def one_colour(img: np.ndarray) -> np.ndarray:
    return np.broadcast_to(img.reshape(-1, img.shape[-1]).mean(0).round().astype(img.dtype), img.shape).copy()


ALTERATIONS = {
    "own": lambda read, i, n: read(i),
    "blur4": lambda read, i, n: blurred(read(i), 4),
    "blur16": lambda read, i, n: blurred(read(i), 16),
    "shuffle": lambda read, i, n: shuffled(read(i)),
    "colour": lambda read, i, n: one_colour(read(i)),
    "other": lambda read, i, n: read((i + 1) % n),
}


def main() -> None:
    try:
        probe()
    except TdrError as exc:  # a bad run, store, split or group: one line, exit 1
        raise SystemExit(f"error: {exc}") from None


def probe() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a tdr training checkpoint trained on a cache group")
    ap.add_argument("--store", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--group", default=None, help="guidance group (default: the run's)")
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--only", default=",".join(ALTERATIONS), help="alterations, comma-separated")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only.split(",")
    unknown = [n for n in names if n not in ALTERATIONS]
    if unknown:
        raise SystemExit(f"error: unknown alteration {unknown[0]!r}; choose from {', '.join(ALTERATIONS)}")
    model, cfg = load_run(args.run)
    if cfg["guidance"] != "cache":
        raise SystemExit(f"error: {args.run} was trained with guidance '{cfg['guidance']}', not a cache group")
    store = open_store(args.store)
    sp = store[args.split]
    source = GuidanceSource(store, args.split, "cache", args.group or cfg["group"])
    n = min(args.images, len(sp))
    conv = metric_convention(store.metric)
    chw = lambda img: torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))  # noqa: E731
    read = lambda i: source.read(i, None)  # noqa: E731
    scores = {}
    for name in ["own"] + [m for m in names if m != "own"]:
        rows = []
        for i in range(n):
            g = ALTERATIONS[name](read, i, n)
            pred = restore(model, to_tensor(sp.read_lq(i)), to_tensor(g), layout=source.layout)[0]
            rows.append(conv.compute(pred, chw(sp.read_gt(i)))["psnr"])
        scores[name] = rows
        print(f"{name:>8}: {np.mean(rows):6.2f} dB  vs own {np.mean(rows) - np.mean(scores['own']):+.2f}   "
              f"per image {' '.join(f'{r:.2f}' for r in rows)}", flush=True)


if __name__ == "__main__":
    main()
