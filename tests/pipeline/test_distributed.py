"""Generation on a dask cluster: two local worker processes give bit-identical guidance to one process;
the SLURM configuration produces the SLURMCluster keyword arguments documented in the README."""

from __future__ import annotations

import numpy as np

from tdr.cache import open_store
from tdr.pipeline import ModelSpec, SamplingSettings, generate_guidance
from tdr.pipeline.distributed import SlurmConfig
from helpers import run

TINY = ["--preset", "tiny", "--steps", "2", "--size", "64", "--device", "cpu", "--dataset", "demo", "--split", "test"]



def test_two_dask_workers_equal_one_process(tmp_path):
    """The command in one process, the library call on two local dask workers (the command's --workers is
    run in test_sources)."""
    one, two = str(tmp_path / "one.zarr"), str(tmp_path / "two.zarr")
    run("generate-guidance", *TINY, "--store", one, "--limit", "4", "--batch-size", "2")
    summary = generate_guidance(two, "demo", ModelSpec(preset="tiny", device="cpu"), SamplingSettings(steps=2),
                                splits=["test"], limit=4, batch_size=1, workers=2)
    assert summary.attention == "dask" and summary.done == 4
    a, b = open_store(one).guidance(), open_store(two).guidance()
    assert a.id == b.id  # same models, same settings: same fingerprint
    done = b.done("test")
    assert list(np.flatnonzero(done)) == [0, 1, 2, 3] and list(np.flatnonzero(a.done("test"))) == [0, 1, 2, 3]
    for i in range(4):
        np.testing.assert_array_equal(a.read("test", i), b.read("test", i))


def test_slurm_config_kwargs():
    kw = SlurmConfig(queue="gpu", account="proj42", jobs=4, cores=16, memory="96GB", walltime="08:00:00",
                     setup=("module load cuda", ". venv/bin/activate"), local_directory="$TMPDIR").cluster_kwargs()
    assert kw == {
        "cores": 1, "processes": 1, "job_cpu": 16, "memory": "96GB", "walltime": "08:00:00",
        "job_extra_directives": ["--gres=gpu:1"], "worker_extra_args": ["--resources", "GPU=1"],
        "job_script_prologue": ["module load cuda", ". venv/bin/activate"],
        "queue": "gpu", "account": "proj42", "local_directory": "$TMPDIR",
    }
    assert "queue" not in SlurmConfig().cluster_kwargs()


def test_slurm_kwargs_accepted_by_dask_jobqueue():
    import pytest

    jobqueue = pytest.importorskip("dask_jobqueue")
    script = jobqueue.SLURMCluster(**SlurmConfig(account="proj42", cores=8).cluster_kwargs(),
                                   scheduler_options={"host": "127.0.0.1", "dashboard_address": None}).job_script()
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH --cpus-per-task=8" in script and "--nthreads 1" in script
    assert "#SBATCH -A proj42" in script and "--resources GPU=1" in script
