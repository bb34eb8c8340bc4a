"""The tiny generation preset's cost at 512²: UNet attention at the fine level (the preset before issue 14:
self-attention over 64² latent tokens) vs at the coarse level only (the preset now), alternating rounds in
one run, one thread, 8 DDIM steps, one image per call. Prints seconds per image of each.

    python bench/tiny_preset.py [--steps 8] [--size 512] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import tdr.pipeline.models as models_mod
from tdr.pipeline import GuidancePipeline, load_components

FINE = {**models_mod.TINY_UNET_CONFIG, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}
COARSE = dict(models_mod.TINY_UNET_CONFIG)


def build(config: dict) -> GuidancePipeline:
    models_mod.TINY_UNET_CONFIG = config
    try:
        return GuidancePipeline(load_components(preset="tiny", device="cpu"))
    finally:
        models_mod.TINY_UNET_CONFIG = COARSE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipes = {"attention at the fine level (before)": build(FINE), "coarse level only (now)": build(COARSE)}
    img = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    best = {name: float("inf") for name in pipes}
    for name, pipe in pipes.items():
        pipe([img], ["warm"], steps=2, size=args.size)
    for _ in range(args.rounds):
        for name, pipe in pipes.items():
            t = time.perf_counter()
            pipe([img], ["x"], steps=args.steps, size=args.size)
            best[name] = min(best[name], time.perf_counter() - t)
    for name, seconds in best.items():
        print(f"{name:40} {seconds:6.2f} s / image")
    a, b = best.values()
    print(f"ratio {a / b:.2f}x")


if __name__ == "__main__":
    main()
