"""The mutual test's back-search (``features.cycle_gap``): both windows from one pass over the
similarities against one pass per window, side by side in one process, CPU.

    python bench/cycle_gap.py [--threads 1] [--repeats 5]

Shapes: a training crop as the ladder trains it (batch 4, 16 channels, 32² match cells: a 64² crop in
its 128² frame window at 1/4 scale, matched into a 512² guidance's 128² cells) and a whole evaluation
image (batch 1, 96×128 cells: 384×512 px), each with the default's windows (the whole input and
±``mutual_window`` cells). Prints the median seconds of each way, their ratio, and the largest
difference between their results.
"""

from __future__ import annotations

import argparse
import time

import torch

from tdr.guided.aggregation import AggregationConfig
from tdr.guided.aggregation.features import cycle_gap

SHAPES = {"training crop": (4, 16, (32, 32), (128, 128)), "whole image": (1, 16, (96, 128), (128, 128))}


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    r = AggregationConfig().mutual_window
    print(f"threads {args.threads}, windows (whole, ±{r} cells), median of {args.repeats}")
    print("| shape | one pass (s) | one pass per window (s) | ratio | max difference |\n|---|---|---|---|---|")
    for name, (B, C, (h, w), (hg, wg)) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        fx, fg = torch.randn(B, C, h, w, generator=g), torch.randn(B, C, hg, wg, generator=g)
        q = torch.stack([torch.randint(0, hg, (B, h, w), generator=g), torch.randint(0, wg, (B, h, w), generator=g)], 1)
        valid = torch.ones(1, 1, h, w, dtype=torch.bool)
        with torch.no_grad():
            one = _median_seconds(lambda: cycle_gap(fx, fg, q, valid, windows=(None, r)), args.repeats)
            each = _median_seconds(lambda: (cycle_gap(fx, fg, q, valid, windows=(None,)),
                                            cycle_gap(fx, fg, q, valid, windows=(r,))), args.repeats)
            a = cycle_gap(fx, fg, q, valid, windows=(None, r))
            b = cycle_gap(fx, fg, q, valid, windows=(None,)) + cycle_gap(fx, fg, q, valid, windows=(r,))
        diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
        print(f"| {name} | {one:.3f} | {each:.3f} | {each / one:.2f}× | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
