"""Training-crop throughput: the tdr store vs a BasicSR-style loader that decodes PNG files per sample.

Both loaders produce the same samples (same images, same random 256² crops, same flips/rotations, the
whole 512² guidance) through a torch DataLoader with the same number of workers, in one run, on
GoPro-sized (1280×720) frames made from scikit-image photographs. Prints samples/s and the ratio.

    python bench/loader.py [--images 24] [--samples 384] [--workers 2] [--patch 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata
from torch.utils.data import DataLoader, Dataset

from tdr.cache.images import to_float_chw, write_png
from tdr.cache.ingest import ingest
from tdr.cache.store import open_store
from tdr.cache.transfer import import_guidance
from tdr.guided.data import SampleSequence, TripleDataset, _apply, augment_ops


def make_frames(root: Path, n: int, size=(720, 1280)) -> None:
    """n (blurred-ish, sharp) frame pairs in the `folder` layout, plus 512² guidance PNGs named by id."""
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    rng = np.random.default_rng(0)
    for i in range(n):
        base = photos[i % len(photos)]
        sharp = np.asarray(Image.fromarray(base).resize((size[1], size[0]), Image.Resampling.BICUBIC))
        sharp = np.clip(sharp.astype(np.int16) + rng.integers(-6, 7, sharp.shape), 0, 255).astype(np.uint8)
        blur = np.asarray(Image.fromarray(sharp).resize((size[1] // 4, size[0] // 4)).resize((size[1], size[0])))
        write_png(root / "train" / "lq" / f"{i:05d}.png", blur)
        write_png(root / "train" / "gt" / f"{i:05d}.png", sharp)
        square = sharp[:, (size[1] - size[0]) // 2:(size[1] + size[0]) // 2]
        write_png(root / "guidance" / f"{i:05d}.png", np.asarray(Image.fromarray(square).resize((512, 512))))


class PngTriples(Dataset):
    """BasicSR-style: decode the whole lq/gt/guidance PNG files for every sample, then crop."""

    def __init__(self, root: Path, ref: TripleDataset, ids: list[str]):
        self.root, self.ref, self.ids = root, ref, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int):
        i = self.ref.image_for(k)
        rng = np.random.default_rng([self.ref.seed, int(k)])
        name = self.ids[i]
        lq_full = np.asarray(Image.open(self.root / "train" / "lq" / f"{name}.png").convert("RGB"))
        gt_full = np.asarray(Image.open(self.root / "train" / "gt" / f"{name}.png").convert("RGB"))
        guide = np.asarray(Image.open(self.root / "guidance" / f"{name}.png").convert("RGB"))
        h, w = lq_full.shape[:2]
        p = self.ref.patch
        top, left = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
        flip, rot = augment_ops(rng)
        lq = _apply(to_float_chw(lq_full[top:top + p, left:left + p]), flip, rot)
        gt = _apply(to_float_chw(gt_full[top:top + p, left:left + p]), flip, rot)
        return {"lq": lq, "gt": gt, "guidance": _apply(to_float_chw(guide), flip, rot)}


def rate(dataset: Dataset, samples: int, workers: int, batch: int) -> tuple[float, list]:
    loader = DataLoader(dataset, batch_size=batch, sampler=SampleSequence(0, samples), num_workers=workers,
                        persistent_workers=False)
    first = []
    start = time.perf_counter()
    for b in loader:
        if not first:
            first = [b["lq"][0].clone(), b["gt"][0].clone(), b["guidance"][0].clone()]
    return samples / (time.perf_counter() - start), first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--samples", type=int, default=384)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "frames"
        make_frames(root, args.images)
        url = str(Path(tmp) / "bench.zarr")
        ingest("folder", str(root), url)
        import_guidance(open_store(url, "a"), "train", root / "guidance")
        ours = TripleDataset(url, "train", patch=args.patch, guidance="cache")
        theirs = PngTriples(root, ours, open_store(url)["train"].ids)
        rate(ours, args.batch * 2, args.workers, args.batch)  # warm the page cache for both
        rate(theirs, args.batch * 2, args.workers, args.batch)
        r_png, a = rate(theirs, args.samples, args.workers, args.batch)
        r_zarr, b = rate(ours, args.samples, args.workers, args.batch)
        same = all(torch.equal(x, y) for x, y in zip(a, b))
        png_bytes = sum(p.stat().st_size for p in root.rglob("*.png"))
        store_bytes = open_store(url).nbytes()
    print(f"{args.images} frames 1280×720, {args.samples} samples of {args.patch}² crops + 512² guidance, "
          f"{args.workers} workers, batch {args.batch}; identical samples: {same}")
    print(f"BasicSR-style PNG decode : {r_png:8.1f} samples/s   ({png_bytes / 2**20:.1f} MiB of PNG)")
    print(f"tdr store (Zarr tiles)   : {r_zarr:8.1f} samples/s   ({store_bytes / 2**20:.1f} MiB store)")
    print(f"ratio store / PNG        : {r_zarr / r_png:8.2f}×")


if __name__ == "__main__":
    main()
