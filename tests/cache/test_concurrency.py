"""Two processes filling one store at once, and crash safety: nothing lost, little done twice, verify clean."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from tdr.cache import open_store
from tdr.cache.report import verify
from helpers import run

TINY = ["--preset", "tiny", "--size", "64", "--device", "cpu", "--dataset", "demo", "--split", "test"]
N = 12  # images in the demo test split



def done_written(output: str) -> int:
    """The 'done' cell of generate-guidance's summary table (0 for 'Nothing to do')."""
    if "Nothing to do" in output:
        return 0
    row = re.search(r"│\s*(\d+)\s*│\s*(\d+)\s*│\s*(\d+)\s*│", output)
    assert row, output
    return int(row.group(1))


def test_two_processes_one_store(tmp_path):
    store = str(tmp_path / "s.zarr")
    run("cache", "ingest", "--dataset", "demo", "--split", "test", "--store", store)
    batch = 2
    cmd = [sys.executable, "-c", "from tdr.cli import main; main()", "generate-guidance", *TINY, "--steps", "6",
           "--store", store, "--batch-size", str(batch)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    written = [done_written(o) for o, _ in outputs]
    assert N <= sum(written) <= N + 2 * batch, written
    assert open_store(store).guidance().done("test").all()
    assert "ok:" in run("cache", "verify", store).output


def test_truncated_chunk_is_detected_and_regenerated(tmp_path):
    store = str(tmp_path / "s.zarr")
    run("generate-guidance", *TINY, "--steps", "2", "--store", store, "--limit", "3")
    gs = open_store(store).guidance()
    before = gs.read("test", 1)
    chunk = Path(store) / "guidance" / gs.id / "test" / "c" / "1" / "0" / "0" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])  # a write cut short by a crash
    assert list(open_store(store).guidance().done("test")[:3]) == [True, False, True]
    result = run("cache", "verify", store, code=1)
    assert "corrupt chunk" in result.output
    again = run("generate-guidance", *TINY, "--steps", "2", "--store", store, "--limit", "1")
    assert done_written(again.output) == 1
    np.testing.assert_array_equal(open_store(store).guidance().read("test", 1), before)  # same pixels, same noise
    problems = verify(open_store(store)).problems  # only the images this --limit run never reached
    assert [p.what for p in problems] == ["missing"] * (N - 3)


def test_processes_creating_one_new_store_at_once(tmp_path):
    """Several ingests of one split into a store that does not exist yet, started at the same moment:
    all succeed (the losers open what the winner made) and the store is whole."""
    import os
    import time

    store = str(tmp_path / "new.zarr")
    start = time.time() + 8.0  # every process imports tdr first, then all begin together
    code = ("import sys, time; from tdr.cache.ingest import ingest; time.sleep(max(0.0, float(sys.argv[2]) - "
            "time.time())); ingest('demo', None, sys.argv[1], splits=['test'])")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, store, str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert time.time() > start  # they did wait for the common start
    st = open_store(store)
    assert st.splits == ["test"] and len(st["test"]) == N and not st.unfinished_splits
    assert verify(st).ok
