"""Guidance generation on a dask.distributed cluster: one model copy per worker, whole batches as tasks.

    spec = ModelSpec(preset="tiny", device="cpu")
    with local_cluster(2) as cluster, Client(cluster) as client:
        summary = generate_distributed(client, spec, url, ["test"], SamplingSettings(steps=2, size=64))

(or, from one call that chooses the cluster: :func:`tdr.pipeline.generate.generate_guidance` with ``workers``
or ``scheduler``.)

A :class:`ModelsPlugin` (a dask ``WorkerPlugin``) loads the models once per worker from a
:class:`~tdr.pipeline.settings.ModelSpec`; each task samples one batch and writes its chunks straight into the shared store
(local disk, shared file system or object store: every worker opens the same URL). The client plans the
work (:func:`tdr.pipeline.generate.plan`), copies guidance of already-known pixels, submits the batches with
``retries=2`` and reports one aggregated progress from ``as_completed``. Noise comes from (seed, content
hash), so the result equals a single-process run bit for bit on CPU, whatever worker samples what.

Clusters: :func:`local_cluster` (dask-cuda's ``LocalCUDACluster`` — one worker per GPU — when it is installed
and GPUs are visible, else CPU worker processes); any running scheduler by address; on SLURM,
:class:`SlurmConfig` gives the keyword arguments of ``dask_jobqueue.SLURMCluster``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from distributed import Client, WorkerPlugin, as_completed, get_worker

from ..cache import claims, open_store
from .generate import (GenerateSummary, Job, ProgressFn, batches_in_random_order, begin, copy_known, failure_lines,
                       read_images, sample, select, stored_texts, write_jobs)
from .settings import BATCH_SIZE, ModelSpec, SamplingSettings

PLUGIN_NAME = "tdr-guidance-models"
ZARR_CONCURRENCY = 4  # per worker; total store I/O ≈ workers × this (zarr's default is 10 per process)


class ModelsPlugin(WorkerPlugin):
    """Loads the guidance models once per worker; tasks find them with :func:`worker_pipeline`."""

    name = PLUGIN_NAME

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.pipe = None
        self.fingerprint: dict | None = None
        self.error: BaseException | None = None
        self.stores: dict = {}

    def setup(self, worker) -> None:
        import zarr

        zarr.config.set({"async.concurrency": ZARR_CONCURRENCY})
        try:
            self.pipe, self.fingerprint = self.spec.load()
        except Exception as exc:  # reported by the first task (one clear message on the client)
            self.error = exc

    def get(self):
        if self.error is not None:
            raise self.error
        return self.pipe


def _plugin() -> ModelsPlugin:
    return get_worker().plugins[PLUGIN_NAME]


def worker_fingerprint() -> dict:
    """Task: the model fingerprint of the worker's models (raises the worker's load error, if any)."""
    plugin = _plugin()
    plugin.get()
    return plugin.fingerprint


def run_batch(url: str, storage_options: Mapping[str, Any] | None, gid: str, settings: SamplingSettings,
              jobs: Sequence[Job], token: str, respect_claims: bool) -> dict:
    """Task: recheck, claim, sample and write one batch; returns counts and the jobs deferred to others."""
    plugin = _plugin()
    pipe = plugin.get()
    key = (url, gid)
    if key not in plugin.stores:
        store = open_store(url, "a", storage_options)
        plugin.stores[key] = (store, store.guidance(gid), {})
    store, gs, views = plugin.stores[key]
    for s in {s for j in jobs for s, _ in j.targets}:
        if s not in views:
            views[s] = store[s]
    ready, deferred = select(gs, jobs, token, respect_claims)
    if not ready:
        return {"written": 0, "sampled": 0, "deferred": deferred}
    try:
        out, texts = sample(pipe, read_images(views, ready), ready, settings, stored_texts(gs, ready))
    except BaseException:
        claims.release(gs, [r for j in ready for r in j.targets])
        raise
    return {"written": write_jobs(gs, ready, out, texts), "sampled": len(ready), "deferred": deferred}


def load_on_workers(client: Client, spec: ModelSpec) -> dict:
    """Load the models on every worker (now and on workers that join later); returns their fingerprint.

    A load error (missing model, bad checkpoint) is raised here, as the worker raised it.
    """
    import zarr

    zarr.config.set({"async.concurrency": ZARR_CONCURRENCY})
    client.register_plugin(ModelsPlugin(spec), name=PLUGIN_NAME)
    return client.submit(worker_fingerprint, pure=False).result()


def generate_distributed(client: Client, spec: ModelSpec, url: str, splits: Sequence[str],
                         settings: SamplingSettings, *, storage_options: Mapping[str, Any] | None = None,
                         batch_size: int = BATCH_SIZE, limit: int | None = None, force: bool = False, retries: int = 2,
                         model_fingerprint: Mapping[str, Any] | None = None,
                         progress: ProgressFn | None = None) -> GenerateSummary:
    """Like :func:`tdr.pipeline.generate.generate`, with the batches sampled by the cluster's workers.

    The store must already hold ``splits`` (see ``open_for_generation``); every worker must reach ``url``.
    ``model_fingerprint``: from an earlier :func:`load_on_workers` with the same ``spec`` (else loads now).
    """
    model_fp = dict(model_fingerprint) if model_fingerprint is not None else load_on_workers(client, spec)
    settings = settings.for_preset(spec.preset)
    store = open_store(url, "a", storage_options)
    gs, work, summary = begin(store, splits, settings, model_fp, limit=limit, force=force, attention="dask",
                              progress=progress)
    if not work.todo:
        return summary
    start = time.perf_counter()
    views = {s: store[s] for s in splits}
    jobs = copy_known(gs, views, work, summary)
    token = claims.new_token()
    options = dict(storage_options) if storage_options else None

    def submit(batch, respect):
        return client.submit(run_batch, url, options, gs.id, settings, batch, token, respect,
                             retries=retries, pure=False)

    futures = {submit(b, True): b for b in batches_in_random_order(jobs, batch_size)}
    deferred: list[Job] = []
    second_round = False
    pending = as_completed(list(futures))
    for future in pending:
        batch = futures.pop(future)
        try:
            result = future.result()
        except Exception as exc:
            summary.failed += [line for j in batch for line in failure_lines(views, j, exc)]
        else:
            summary.done += result["written"]
            summary.sampled += result["sampled"]
            deferred += result["deferred"]
        if not futures and deferred and not second_round:  # recheck what other writers had claimed
            second_round = True
            for k in range(0, len(deferred), batch_size):
                f = submit(deferred[k:k + batch_size], False)
                futures[f] = deferred[k:k + batch_size]
                pending.add(f)
        if progress:
            progress({"event": "batch", "done": summary.done, "failed": len(summary.failed), "total": work.todo})
    summary.seconds = time.perf_counter() - start
    return summary


def local_cluster(n_workers: int):
    """A cluster on this machine: one worker per GPU (dask-cuda) when GPUs are visible, else CPU processes.

    Workers listen on 127.0.0.1 only and have no dashboard; each runs one task at a time.
    """
    import torch
    from distributed import LocalCluster

    if torch.cuda.is_available():
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            pass
        else:
            gpus = ",".join(str(i) for i in range(min(n_workers, torch.cuda.device_count())))
            return LocalCUDACluster(CUDA_VISIBLE_DEVICES=gpus, threads_per_worker=1, host="127.0.0.1",
                                    dashboard_address=None)
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address=None)


@dataclass(frozen=True)
class SlurmConfig:
    """One SLURM job per GPU, each running one dask worker; :meth:`cluster_kwargs` → ``SLURMCluster(**kw)``.

    dask-jobqueue is imported only by :meth:`cluster`. Typical use on a login node::

        cluster = SlurmConfig(account="proj42", queue="gpu", jobs=8).cluster()
        # then, in another shell, while this process keeps the cluster alive:
        #   tdr generate-guidance ... --scheduler <cluster.scheduler_address>
    """

    queue: str | None = None
    account: str | None = None
    jobs: int = 1                      # jobs = GPUs = workers
    cores: int = 8                     # CPU cores per job (data loading, zarr codecs)
    memory: str = "64GB"
    walltime: str = "04:00:00"
    gres: str = "gpu:1"
    local_directory: str | None = None  # node-local scratch for dask spill files, e.g. "$TMPDIR"
    setup: tuple[str, ...] = ()        # shell lines run before the worker, e.g. ("module load cuda", ". venv/bin/activate")
    extra_directives: tuple[str, ...] = field(default_factory=tuple)

    def cluster_kwargs(self) -> dict:
        kw: dict[str, Any] = {
            "cores": 1,                # one worker thread: one batch at a time on the job's GPU
            "processes": 1,
            "job_cpu": self.cores,     # but book all cores for the job (reading, codecs, torch host work)
            "memory": self.memory,
            "walltime": self.walltime,
            "job_extra_directives": [f"--gres={self.gres}", *self.extra_directives],
            "worker_extra_args": ["--resources", "GPU=1"],
            "job_script_prologue": list(self.setup),
        }
        if self.queue:
            kw["queue"] = self.queue
        if self.account:
            kw["account"] = self.account
        if self.local_directory:
            kw["local_directory"] = self.local_directory
        return kw

    def cluster(self):
        """Start a ``dask_jobqueue.SLURMCluster`` and submit :attr:`jobs` jobs."""
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            from ..errors import TdrError

            raise TdrError("SLURM clusters need dask-jobqueue; install it with 'pip install dask-jobqueue'.") from None
        cluster = SLURMCluster(**self.cluster_kwargs())
        cluster.scale(jobs=self.jobs)
        return cluster

