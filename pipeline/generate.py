"""``generate()``: fill a store's guidance group, batch by batch, resumable and safe to run concurrently.

Reading the next batch's degraded images and writing the previous batch's guidance run on threads
beside the sampler, so the GPU only samples. Each image is written as soon as its batch finishes, as
one checksummed chunk; images already done (chunk present, checksum good) are skipped, so a killed or
interrupted run is finished by running it again.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..cache import open_store
from ..cache.errors import StoreError
from ..cache.store import GUIDANCE_SIZE, GuidanceSet, Store

ProgressFn = Callable[[dict], None]


@dataclass(frozen=True)
class SamplingSettings:
    """What, besides the models, determines guidance (SPEC §3: paper defaults)."""

    steps: int = 200
    scale: float = 5.0
    seed: int = 0
    layout: str = "center"
    size: int = GUIDANCE_SIZE


@dataclass
class GenerateSummary:
    group: str = ""
    done: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    attention: str = ""

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / self.done if self.done else float("nan")


def guidance_fingerprint(model_fingerprint: Mapping[str, Any], settings: SamplingSettings) -> dict:
    """The store fingerprint: the models' (see ``pipeline.models.fingerprint``) plus sampling settings."""
    fp = {("model_seed" if k == "seed" else k): v for k, v in model_fingerprint.items()}
    fp.update(steps=settings.steps, scale=float(settings.scale), seed=settings.seed, layout=settings.layout)
    return fp


def plan(gs: GuidanceSet, splits: Sequence[str], limit: int | None) -> tuple[list[tuple[str, int]], int]:
    """(split, row) pairs still to generate (at most ``limit``), and how many are already done."""
    todo, skipped = [], 0
    for split in splits:
        done = gs.done(split)
        skipped += int(done.sum())
        todo += [(split, int(i)) for i in np.flatnonzero(~done)]
    return (todo[:limit] if limit is not None else todo), skipped


def open_for_generation(url: str, dataset: str, root: str | None, splits: Sequence[str] | None,
                        storage_options: Mapping[str, Any] | None = None,
                        ingest_progress: Callable[[str, int, int], None] | None = None) -> tuple[Store, list[str]]:
    """Open the store, ingesting the dataset's missing splits first; returns (store, splits to fill).

    With ``splits`` None: every split already in the store, or, for a new store, every split found.
    """
    from ..cache.ingest import ingest

    try:
        present = open_store(url, "a", storage_options).splits
    except StoreError as exc:
        if "No tdr store" not in str(exc):
            raise
        present = []
    missing = [s for s in splits if s not in present] if splits else ([] if present else None)
    if missing is None or missing:
        ingest(dataset, root, url, splits=missing, storage_options=storage_options, progress=ingest_progress)
    store = open_store(url, "a", storage_options)
    if store.dataset != dataset:
        raise StoreError(f"Store {url} holds dataset '{store.dataset}', not '{dataset}'; use one store per dataset.")
    return store, list(splits) if splits else store.splits


def generate(store: Store, splits: Sequence[str], pipe, settings: SamplingSettings, model_fingerprint: Mapping[str, Any],
             *, batch_size: int = 8, limit: int | None = None, force: bool = False,
             progress: ProgressFn | None = None) -> GenerateSummary:
    """Generate the missing guidance of ``splits`` with ``pipe`` (a :class:`GuidancePipeline`).

    ``progress`` receives dicts: ``{"event": "plan", "todo": n, "skipped": k}``, then
    ``{"event": "batch", "done": d, "failed": f, "total": n}`` after each batch is written.
    """
    gs = store.guidance_for(guidance_fingerprint(model_fingerprint, settings), size=settings.size, force=force)
    todo, skipped = plan(gs, splits, limit)
    summary = GenerateSummary(group=gs.id, skipped=skipped, attention=getattr(pipe, "attention_backend", ""))
    if progress:
        progress({"event": "plan", "todo": len(todo), "skipped": skipped, "group": gs.id})
    if not todo:
        return summary
    views = {s: store[s] for s in splits}
    for s in {s for s, _ in todo}:
        gs.array(s, create=True)
    batches = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]

    def read(batch):
        return [views[s].read_lq(i) for s, i in batch]

    def write(batch, images):
        for (s, i), img in zip(batch, images):
            gs.write(s, i, img)
        return len(batch)

    start = time.perf_counter()
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        next_images: Future = reader.submit(read, batches[0])
        pending: Future | None = None
        for b, batch in enumerate(batches):
            images = next_images.result()
            if b + 1 < len(batches):
                next_images = reader.submit(read, batches[b + 1])
            ids = [views[s].ids[i] for s, i in batch]
            try:
                out = pipe([_rgb8(im) for im in images], ids, steps=settings.steps, scale=settings.scale,
                           seed=settings.seed, layout=settings.layout, size=settings.size)
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as exc:  # one bad batch does not stop the job; it is reported and retried next run
                summary.failed += [f"{s}/{views[s].ids[i]}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                                   for s, i in batch]
                out = None
            if pending is not None:
                summary.done += pending.result()
            pending = writer.submit(write, batch, out) if out is not None else None
            if progress:
                progress({"event": "batch", "done": summary.done + (len(batch) if out is not None else 0),
                          "failed": len(summary.failed), "total": len(todo)})
        if pending is not None:
            summary.done += pending.result()
    summary.seconds = time.perf_counter() - start
    return summary


def _rgb8(img: np.ndarray) -> np.ndarray:
    """Guidance is made from 8-bit RGB: 16-bit inputs (DPDD) are scaled down."""
    if img.dtype == np.uint16:
        return (img.astype(np.float32) / 257.0).round().astype(np.uint8)
    return img
