"""CPU thread policy under a busy machine: training iterations/s of the demo's model with torch's default
threads, one thread, the default threads with ``OMP_WAIT_POLICY=PASSIVE``, and the policy the ``tdr``
entry point applies (threads = cores not busy at start, PASSIVE; ``tdr.cli.apply_cpu_policy``), each alone
and beside one CPU-bound process (``python -c "while True: pass"``), measured side by side in one run.

Each policy runs in a fresh process (OpenMP reads its wait policy when torch loads it): ``--iters``
training steps of ``nafnet-small`` on random 64² crops, batch 4 (the demo's settings), after 3 warm-up
steps. Prints one table; the numbers go to BENCHMARKS.md with the machine and its load.

    python bench/threads.py [--iters 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORK = r'''
import json, sys, time
threads = int(sys.argv[1]); iters = int(sys.argv[2])
if threads < 0:  # the policy `tdr` applies at its entry point, before torch loads
    from tdr.cli import apply_cpu_policy
    apply_cpu_policy(["train"])
import torch
if threads > 0:
    torch.set_num_threads(threads)
from tdr.guided.backbones import build_backbone
torch.manual_seed(0)
model = build_backbone("nafnet-small", guided=False)
opt = torch.optim.AdamW(model.parameters(), 1e-3)
x, y = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64)
def step():
    loss = torch.nn.functional.l1_loss(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(3):
    step()
t = time.perf_counter()
for _ in range(iters):
    step()
print(json.dumps({"it_s": iters / (time.perf_counter() - t), "threads": torch.get_num_threads()}))
'''

POLICIES = {  # name -> (torch threads (0: torch's default), extra environment)
    "default threads": (0, {}),
    "1 thread": (1, {}),
    "default threads + OMP_WAIT_POLICY=PASSIVE": (0, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "tdr policy: idle cores + PASSIVE": (-1, {}),
}


def run(threads: int, env: dict, iters: int) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", WORK, str(threads), str(iters)], env={**full, **env},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"cores {os.cpu_count()}, load before {os.getloadavg()[0]:.2f}")
    rows = []
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            time.sleep(1.0 if busy else 0.0)
            for name, (threads, env) in POLICIES.items():
                results = [run(threads, env, args.iters) for _ in range(args.repeats)]
                best = max(r["it_s"] for r in results)
                rows.append((busy, name, best))
                print(f"{'busy' if busy else 'idle':5} {name:40} {best:6.2f} it/s  threads "
                      f"{','.join(str(r['threads']) for r in results)}  (load {os.getloadavg()[0]:.2f})", flush=True)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
