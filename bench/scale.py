"""Scale-out of guidance generation on dask: images/s with 1 and 2 local workers, their ratio and the
per-worker efficiency (ratio / workers), measured side by side in one run.

Tiny random models on CPU by default (each worker: one torch thread, one batch at a time); on a machine
with GPUs and dask-cuda, ``--device cuda`` gives one worker per GPU. Each cluster is warmed up (models
loaded, first batch run) before the timed run into a fresh store.

    python bench/scale.py [--images 24] [--steps 8] [--batch-size 2] [--workers 1,2] [--device cpu]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from distributed import Client

from tdr.pipeline.distributed import generate_distributed, load_on_workers, local_cluster
from tdr.pipeline.generate import open_for_generation
from tdr.pipeline.settings import ModelSpec, SamplingSettings


def rate(n_workers: int, spec: ModelSpec, settings: SamplingSettings, work: Path, images: int, batch: int) -> float:
    """Images/s of one timed run on a warmed-up cluster of ``n_workers``."""
    with local_cluster(n_workers) as cluster, Client(cluster) as client:
        fp = load_on_workers(client, spec)
        runs = {}
        for name, limit in (("warm", n_workers * batch), ("timed", images)):
            url = str(work / f"{name}-{n_workers}.zarr")
            open_for_generation(url, "demo", None, ["train"])
            runs[name] = generate_distributed(client, spec, url, ["train"], settings, batch_size=batch, limit=limit,
                                              model_fingerprint=fp)
        timed = runs["timed"]
        return timed.done / timed.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    logging.getLogger("distributed").setLevel(logging.ERROR)
    spec = ModelSpec(preset="tiny", device=args.device, threads=1 if args.device == "cpu" else None)
    settings = SamplingSettings(steps=args.steps, size=args.size)
    counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        rates = {n: rate(n, spec, settings, Path(tmp), args.images, args.batch_size) for n in counts}
    base = rates[counts[0]] / counts[0]
    print(f"tiny models, {args.device}, {args.images} images, {args.steps} steps, {args.size}², batch {args.batch_size}")
    print("workers  images/s  speed-up  per-worker efficiency")
    for n, r in rates.items():
        print(f"{n:7d}  {r:8.2f}  {r / rates[counts[0]]:7.2f}x  {r / (base * n):8.0%}")


if __name__ == "__main__":
    main()
