"""Filling a store's guidance group, batch by batch, resumable and safe to run concurrently.

:func:`generate_guidance` is the one call a researcher makes (a store URL, a dataset, a
:class:`~tdr.pipeline.settings.ModelSpec`, :class:`~tdr.pipeline.settings.SamplingSettings`): it ingests
missing splits, loads the models here or on dask workers (:mod:`tdr.pipeline.distributed`) and runs
:func:`generate`, the local loop, or its distributed twin::

    summary = generate_guidance("demo.zarr", "demo", ModelSpec(preset="tiny", device="cpu"),
                                SamplingSettings(steps=2), splits=["test"], workers=2)

Work is planned by content (:mod:`tdr.cache.merge`): an image whose degraded pixels already have guidance
in this group — in any split — is copied, and equal pixels within the work are sampled once. Each image's
noise comes from (seed, sha256 of its degraded pixels), so equal pixels give equal guidance by
construction, whichever split, dataset, store, batch or worker they come from.

Reading the next batch's degraded images and writing the previous batch's guidance run on threads beside
the sampler, so the GPU only samples. Each image is written as soon as its batch finishes, as one
checksummed chunk; images already done (chunk present, checksum good) are skipped, so a killed run is
finished by running it again. Several processes may fill one group at once: each walks the batches in
its own random order, rechecks right before sampling, and defers images another writer has claimed
(:mod:`tdr.cache.claims`), so work done twice is at most the batches in flight.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..cache import captions, claims, open_store
from ..errors import StoreError, StoreNotFoundError
from ..cache.merge import content_index, copy_guidance, rows_by_content
from ..cache.store import GuidanceSet, Split, Store
from .settings import BATCH_SIZE, ModelSpec, SamplingSettings, SettingsError

ProgressFn = Callable[[dict], None]
Row = tuple[str, int]  # (split, row)
NOISE = "content-sha256"  # fingerprint entry: noise drawn from (seed, sha256 of the degraded pixels)


@dataclass(frozen=True)
class Job:
    """One distinct degraded content to sample, and every (split, row) that holds it."""

    key: str                     # sha256 hex of the degraded pixels: content address and noise id
    targets: tuple[Row, ...]


@dataclass
class Plan:
    jobs: list[Job]              # contents to sample
    copies: list[tuple[Row, Row]]  # (source, target): guidance already present for the same pixels
    skipped: int                 # images already done

    @property
    def todo(self) -> int:
        return sum(len(j.targets) for j in self.jobs) + len(self.copies)


@dataclass
class GenerateSummary:
    group: str = ""
    splits: list[str] = field(default_factory=list)  # the splits filled
    done: int = 0                # images whose guidance this run wrote (sampled or copied)
    sampled: int = 0             # distinct contents this run sampled
    copied: int = 0              # images filled by copying guidance of equal pixels
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    attention: str = ""

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.done if self.done else float("nan")


def guidance_fingerprint(model_fingerprint: Mapping[str, Any], settings: SamplingSettings) -> dict:
    """The store fingerprint: the models' (:func:`tdr.pipeline.fingerprints.fingerprint`) plus sampling settings."""
    fp = {("model_seed" if k == "seed" else k): v for k, v in model_fingerprint.items()}
    fp.update(steps=settings.steps, scale=float(settings.scale), seed=settings.seed, layout=settings.layout,
              noise=NOISE)
    return fp


def plan(gs: GuidanceSet, splits: Sequence[str], limit: int | None) -> Plan:
    """What is left to do in ``splits`` (at most ``limit`` images): copies, distinct contents to sample."""
    todo: list[Row] = []
    done = {}
    for split in splits:
        done[split] = gs.done(split) if split in gs.group else np.zeros(len(gs.store[split]), bool)
        todo += [(split, int(i)) for i in np.flatnonzero(~done[split])]
    skipped = sum(int(d.sum()) for d in done.values())
    todo = todo[:limit] if limit is not None else todo
    index = content_index(gs, done)
    copies, jobs = [], []
    for sha, rows in rows_by_content(gs.store, todo).items():
        if sha in index:
            copies += [(index[sha], r) for r in rows]
        else:
            jobs.append(Job(sha.hex(), tuple(rows)))
    return Plan(jobs, copies, skipped)


def open_for_generation(url: str, dataset: str, root: str | None, splits: Sequence[str] | None,
                        storage_options: Mapping[str, Any] | None = None,
                        ingest_progress: Callable[[str, int, int], None] | None = None) -> tuple[Store, list[str]]:
    """Open the store, ingesting the dataset's missing splits first; returns (store, splits to fill).

    With ``splits`` None: every split already in the store, or, for a new store, every split found.
    """
    from ..cache.ingest import ingest

    try:
        present = open_store(url, "a", storage_options).splits
    except StoreNotFoundError:
        present = []
    missing = [s for s in splits if s not in present] if splits else ([] if present else None)
    if missing is None or missing:
        ingest(dataset, root, url, splits=missing, storage_options=storage_options, progress=ingest_progress)
    store = open_store(url, "a", storage_options)
    if store.dataset != dataset:
        raise StoreError(f"Store {url} holds dataset '{store.dataset}', not '{dataset}'; use one store per dataset.")
    return store, list(splits) if splits else store.splits


# ---- the pieces of one batch, shared by the local loop and the dask tasks -------------------------------
def select(gs: GuidanceSet, jobs: Sequence[Job], token: str, respect_claims: bool) -> tuple[list[Job], list[Job]]:
    """Right before sampling: drop targets done meanwhile; (jobs to sample now, jobs claimed by others)."""
    rows = [r for j in jobs for r in j.targets]
    present = {r for r, there in zip(rows, claims.exists(gs, rows)) if there and _readable(gs, r)}
    jobs = [Job(j.key, tuple(r for r in j.targets if r not in present)) for j in jobs]
    jobs = [j for j in jobs if j.targets]
    if not respect_claims or not jobs:
        return jobs, []
    rows = [r for j in jobs for r in j.targets]
    taken = dict(zip(rows, claims.claimed_by_others(gs, rows, token)))
    deferred = [j for j in jobs if any(taken[r] for r in j.targets)]
    ready = [j for j in jobs if not any(taken[r] for r in j.targets)]
    claims.claim(gs, [r for j in ready for r in j.targets], token)
    return ready, deferred


def _readable(gs: GuidanceSet, row: Row) -> bool:
    """A chunk that exists is done only if its checksum passes (a truncated one is regenerated)."""
    try:
        gs.group[row[0]][row[1]]
        return True
    except Exception:
        return False


def read_images(views: Mapping[str, Split], jobs: Sequence[Job]) -> list[np.ndarray]:
    """Degraded images (H, W, 3) uint8 of each job (from its first target)."""
    return [_rgb8(views[j.targets[0][0]].read_lq(j.targets[0][1])) for j in jobs]


def stored_texts(gs: GuidanceSet, jobs: Sequence[Job]) -> list[dict | None] | None:
    """Caption records already in the group for each job (hand-edited ones among them), None if it has none."""
    if not captions.has_captions(gs):
        return None
    return [captions.read(gs, *j.targets[0]) for j in jobs]


def sample(pipe, images: Sequence[np.ndarray], jobs: Sequence[Job], settings: SamplingSettings,
           texts: Sequence[dict | None] | None = None) -> tuple[np.ndarray, list[dict] | None]:
    """(B, S, S, 3) uint8 guidance and the source's per-image texts; noise from (seed, content hash).

    ``pipe``: a :class:`~tdr.pipeline.GuidancePipeline`, or any callable with its ``__call__`` signature
    (then no texts). ``settings.size`` must be settled (:meth:`SamplingSettings.for_preset`)."""
    if not hasattr(pipe, "generate"):
        return pipe(list(images), [j.key for j in jobs], **asdict(settings)), None
    return pipe.generate(list(images), [j.key for j in jobs], settings, texts=texts)


def write_jobs(gs: GuidanceSet, jobs: Sequence[Job], images: np.ndarray, texts: Sequence[dict] | None = None) -> int:
    """Write each job's caption (if any), then its guidance, to all its targets, then drop their claims;
    returns images written."""
    n = 0
    for k, (job, img) in enumerate(zip(jobs, images, strict=True)):
        for s, i in job.targets:
            if texts is not None:
                captions.write(gs, s, i, texts[k])
            gs.write(s, i, img)
            n += 1
    claims.release(gs, [r for j in jobs for r in j.targets])
    return n


def batches_in_random_order(jobs: Sequence[Job], batch_size: int, rng: random.Random | None = None) -> list[list[Job]]:
    """Batches of ``batch_size`` jobs, shuffled so concurrent writers start in different places."""
    batches = [list(jobs[k:k + batch_size]) for k in range(0, len(jobs), batch_size)]
    (rng or random.Random()).shuffle(batches)
    return batches


def copy_known(gs: GuidanceSet, views: Mapping[str, Split], work: Plan, summary: GenerateSummary) -> list[Job]:
    """Copy guidance of equal pixels (counted in ``summary``); returns the jobs to sample: the plan's, and one
    for each target whose copy source was unreadable."""
    bad = [target for source, target in work.copies if not copy_guidance(gs, source, gs, target)]
    summary.copied = summary.done = len(work.copies) - len(bad)
    return work.jobs + [Job(views[s].lq_sha(i).tobytes().hex(), ((s, i),)) for s, i in bad]


def failure_lines(views: Mapping[str, Split], job: Job, exc: BaseException) -> list[str]:
    """One report line per target of a job that failed: ``split/id: first line of the error``."""
    why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return [f"{s}/{views[s].ids[i]}: {why}" for s, i in job.targets]


def begin(store: Store, splits: Sequence[str], settings: SamplingSettings, model_fingerprint: Mapping[str, Any], *,
          limit: int | None, force: bool, attention: str, progress: ProgressFn | None):
    """Shared start of the local and the distributed run: the guidance group (refused if the store holds
    other settings), the plan, an empty summary, the ``plan`` progress event, the split arrays.
    ``settings.size`` must be settled (:meth:`SamplingSettings.for_preset`).

    In a store holding only generated guidance, a source with no group yet gets its own group without
    ``force`` (it becomes the default, as any added group); other settings for a source already there, and
    anything beside imported guidance, are refused as before."""
    from .sources import SOURCES, source_of

    fp = guidance_fingerprint(model_fingerprint, settings)
    present = {source_of(store.guidance(g).fingerprint) for g in store.guidance_ids()}
    new_source = bool(present) and present <= set(SOURCES) and source_of(fp) not in present
    gs = store.guidance_for(fp, size=settings.size, provenance="generated", force=force or new_source)
    work = plan(gs, splits, limit)
    summary = GenerateSummary(group=gs.id, splits=list(splits), skipped=work.skipped, attention=attention)
    if progress:
        progress({"event": "plan", "todo": work.todo, "skipped": work.skipped, "group": gs.id})
    if work.todo:
        for s in splits:
            gs.array(s, create=True)
    return gs, work, summary


# ---- the local loop ----------------------------------------------------------------------------------
def generate(store: Store, splits: Sequence[str], pipe, settings: SamplingSettings, model_fingerprint: Mapping[str, Any],
             *, batch_size: int = BATCH_SIZE, limit: int | None = None, force: bool = False,
             progress: ProgressFn | None = None) -> GenerateSummary:
    """Generate the missing guidance of ``splits`` with ``pipe`` (a :class:`GuidancePipeline`).

    ``progress`` receives dicts: ``{"event": "plan", "todo": n, "skipped": k}``, then
    ``{"event": "batch", "done": d, "failed": f, "total": n}`` after each batch is written.
    """
    settings = settings.for_preset(model_fingerprint.get("preset"))
    gs, work, summary = begin(store, splits, settings, model_fingerprint, limit=limit, force=force,
                              attention=getattr(pipe, "attention_backend", ""), progress=progress)
    if not work.todo:
        return summary
    views = {s: store[s] for s in splits}
    start = time.perf_counter()
    jobs = copy_known(gs, views, work, summary)

    def tick() -> None:
        if progress:
            progress({"event": "batch", "done": summary.done, "failed": len(summary.failed), "total": work.todo})

    tick()
    token = claims.new_token()
    deferred = _run(gs, views, pipe, settings, batches_in_random_order(jobs, batch_size), token, True, summary, tick)
    _run(gs, views, pipe, settings, [deferred[k:k + batch_size] for k in range(0, len(deferred), batch_size)],
         token, False, summary, tick)
    summary.seconds = time.perf_counter() - start
    return summary



def generate_guidance(store: str, dataset: str, models: ModelSpec | None = None,
                      settings: SamplingSettings | None = None, *, root: str | os.PathLike | None = None,
                      splits: Sequence[str] | None = None, batch_size: int = BATCH_SIZE, limit: int | None = None,
                      force: bool = False, workers: int = 0, scheduler: str | None = None,
                      storage_options: Mapping[str, Any] | None = None,
                      progress: ProgressFn | None = None) -> GenerateSummary:
    """Fill the guidance of ``dataset``'s ``splits`` in the store at ``store`` (a path or fsspec URL); resumable.

    ``models`` (default ``ModelSpec()``, the paper's) are loaded in this process, or once per
    dask worker with ``workers`` > 0 (a local cluster: one worker per GPU, else CPU processes) or
    ``scheduler`` (the address of a running cluster; every worker must reach ``store``). ``settings``
    default to the paper's at the models' own size. Splits the store lacks are ingested from ``root``
    first; ``splits`` None: every split already in the store, or all of the dataset for a new store.
    ``force``: add a guidance group even if the store holds guidance of other settings.

    Models are loaded before the store is touched, so a missing model writes nothing. ``progress``
    receives dicts: ``{"event": "ingest", "split", "done", "total"}`` while ingesting, then the events of
    :func:`generate`.
    """
    import torch

    models = models or ModelSpec()
    settings = (settings or SamplingSettings()).for_preset(models.preset)
    root = str(root) if root is not None else None
    if workers < 0:
        raise SettingsError(f"workers must be 0 (this process) or more, got {workers}.")
    if batch_size < 1:
        raise SettingsError(f"batch_size must be at least 1, got {batch_size}.")
    if (models.device or "").startswith("cuda") and not torch.cuda.is_available() and not scheduler:
        raise SettingsError(f"device {models.device!r} was asked for but no CUDA GPU is visible; use device 'cpu'.")

    def ingest_progress(split: str, done: int, total: int) -> None:
        if progress:
            progress({"event": "ingest", "split": split, "done": done, "total": total})

    run = dict(settings=settings, batch_size=batch_size, limit=limit, force=force, progress=progress)
    if not (workers or scheduler):
        pipe, model_fp = models.load()
        st, todo = open_for_generation(store, dataset, root, splits, storage_options, ingest_progress)
        return generate(st, todo, pipe, model_fingerprint=model_fp, **run)

    from distributed import Client

    from .distributed import generate_distributed, load_on_workers, local_cluster

    if workers and not scheduler and models.threads is None:  # CPU workers: this process's threads, its bits
        models = replace(models, threads=torch.get_num_threads())
    with contextlib.ExitStack() as stack:
        cluster = scheduler or stack.enter_context(local_cluster(workers))
        client = stack.enter_context(Client(cluster))
        model_fp = load_on_workers(client, models)
        _, todo = open_for_generation(store, dataset, root, splits, storage_options, ingest_progress)
        return generate_distributed(client, models, store, todo, storage_options=storage_options,
                                    model_fingerprint=model_fp, **run)


def _run(gs, views, pipe, settings, batches, token, respect_claims, summary, tick) -> list[Job]:
    """Sample ``batches`` with prefetch and write-behind threads; returns jobs deferred to other writers."""
    deferred: list[Job] = []
    if not batches:
        return deferred
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        next_images: Future = reader.submit(read_images, views, batches[0])
        pending: Future | None = None
        for b, batch in enumerate(batches):
            images = dict(zip([j.key for j in batch], next_images.result()))
            if b + 1 < len(batches):
                next_images = reader.submit(read_images, views, batches[b + 1])
            ready, later = select(gs, batch, token, respect_claims)
            deferred += later
            if not ready:
                continue
            try:
                out, texts = sample(pipe, [images[j.key] for j in ready], ready, settings, stored_texts(gs, ready))
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as exc:  # one bad batch does not stop the job; it is reported and retried next run
                summary.failed += [line for j in ready for line in failure_lines(views, j, exc)]
                claims.release(gs, [r for j in ready for r in j.targets])
                out = None
            if pending is not None:
                summary.done += pending.result()
            if out is not None:
                summary.sampled += len(ready)
                pending = writer.submit(write_jobs, gs, ready, out, texts)
            else:
                pending = None
            tick()
        if pending is not None:
            summary.done += pending.result()
            tick()
    return deferred


def _rgb8(img: np.ndarray) -> np.ndarray:
    """Guidance is made from 8-bit RGB: 16-bit inputs (DPDD) are scaled down."""
    if img.dtype == np.uint16:
        return (img.astype(np.float32) / 257.0).round().astype(np.uint8)
    return img
