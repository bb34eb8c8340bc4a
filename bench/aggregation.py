"""Benchmark the dynamic aggregation beside the backbone's own forward: time and peak memory.

    python bench/aggregation.py                      # nafnet-w32, batch 8, 384², guidance 512², no grad
    python bench/aggregation.py --train              # forward + backward
    python bench/aggregation.py --device cuda --search global

Cases, each in a fresh subprocess so their memory does not mix: the unguided backbone, the aggregation's
``prepare`` alone (shared encoder on X and G, matching, transfer) and the whole guided model. CPU peak
memory = the process's peak RSS during the run minus its RSS just before; CUDA = torch's peak
allocation minus the allocation before. The paper's code unfolds about 7 GB (fp32) at its finest level
for this shape. Prints a table; ratios are to the backbone measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from tdr.guided.aggregation import SEARCHES, AggregationConfig

CASES = ("backbone", "prepare", "guided")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(case: str, args) -> dict:
    import torch

    from tdr.guided.aggregation import AggregationConfig
    from tdr.guided.backbones import build_backbone
    from tdr.guided.backbones.common import pad_to_multiple

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    config = AggregationConfig(search=args.search, checkpoint_fusion=args.checkpoint_fusion)
    model = build_backbone(args.backbone, guided=case != "backbone", aggregation=config).to(dev).train(args.train)
    x = torch.rand(args.batch, 3, args.size, args.size, device=dev)
    g = torch.rand(args.batch, 3, args.guidance, args.guidance, device=dev)

    def run(x, g):
        if case == "backbone":
            out = model(x)
        elif case == "prepare":
            aligned = model.agg.prepare(pad_to_multiple(x, model.multiple), g, x.shape[-2:])
            out = sum(t.mean() for t in aligned if t is not None)
        else:
            out = model(x, g)
        if args.train:
            out.mean().backward()
        return out

    with torch.set_grad_enabled(args.train):
        run(x[:1, :, :64, :64], g[:1, :, :64, :64])  # warm-up: kernels, allocator
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _rss_bytes()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run(x, g)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated() - before
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"case": case, "seconds": min(times), "peak_bytes": max(0, peak)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="nafnet-w32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--guidance", type=int, default=512)
    p.add_argument("--search", default=AggregationConfig().search, choices=SEARCHES)
    p.add_argument("--train", action="store_true", help="forward + backward instead of a no-grad forward")
    p.add_argument("--checkpoint-fusion", action="store_true", help="recompute fusion blocks in backward")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args)))
        return
    forwarded = list(argv if argv is not None else sys.argv[1:])
    results = {}
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, *forwarded, "--worker", case],
                             check=True, capture_output=True, text=True).stdout
        results[case] = json.loads(out.strip().splitlines()[-1])
    base = results["backbone"]
    mode = "forward+backward" if args.train else "no-grad forward"
    print(f"{args.backbone}, batch {args.batch}, {args.size}², guidance {args.guidance}², search {args.search}, "
          f"{mode}{', fusion checkpointed' if args.checkpoint_fusion else ''}, {args.device} ({args.threads} threads)")
    print(f"{'case':42s} {'time s':>8s} {'× backbone':>10s} {'peak MiB':>9s} {'× backbone':>10s}")
    rows = [("backbone (unguided)", base),
            ("aggregation prepare (enc+match+transfer)", results["prepare"]),
            ("guided model (backbone + aggregation)", results["guided"])]
    overhead = {"seconds": results["guided"]["seconds"] - base["seconds"],
                "peak_bytes": results["guided"]["peak_bytes"] - base["peak_bytes"]}
    rows.append(("aggregation overhead (guided − backbone)", overhead))
    for name, r in rows:
        print(f"{name:42s} {r['seconds']:8.2f} {r['seconds'] / base['seconds']:10.2f} "
              f"{r['peak_bytes'] / 2**20:9.0f} {r['peak_bytes'] / max(1, base['peak_bytes']):10.2f}")
    print("paper's code: ≈ 7 GB (fp32) for its finest-level unfold alone at this shape")


if __name__ == "__main__":
    main()
