"""The tiny generation preset's cost by guidance side: 512² (its default before issue 14, SD-2.1-base's
size: the tiny UNet's self-attention runs over 64² latent tokens) vs 64² (its default now, what tests and
the demo use), alternating rounds in one run, one thread, 8 DDIM steps, one image per call.

    python bench/tiny_preset.py [--steps 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tdr.pipeline import GuidancePipeline, load_components


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = GuidancePipeline(load_components(preset="tiny", device="cpu"))
    img = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    sizes = {"512² (before)": 512, "64² (now)": 64}
    best = {name: float("inf") for name in sizes}
    for size in sizes.values():
        pipe([img], ["warm"], steps=1, size=size)
    for _ in range(args.rounds):
        for name, size in sizes.items():
            t = time.perf_counter()
            pipe([img], ["x"], steps=args.steps, size=size)
            best[name] = min(best[name], time.perf_counter() - t)
    for name, seconds in best.items():
        print(f"{name:16} {seconds:7.3f} s / image")
    a, b = best.values()
    print(f"ratio {a / b:.1f}x")


if __name__ == "__main__":
    main()
