"""Ingest a dataset (folder layout → pairs) into a guidance store.

Degraded and clean images are stored losslessly in spatial tiles (one shard per image), so a training
crop reads only the tiles it covers. A clean image shared by many degraded images (SOTS, DDN) is stored
once. A split is marked ``complete`` only after every image is written; a failed ingest removes the split
it was writing and leaves everything else in the store untouched.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .errors import DatasetError, StoreError, TdrError
from .store import _COMPRESSORS, Store, create_store, pixel_sha256

if TYPE_CHECKING:
    from .datasets import Pair

Progress = Callable[[str, int, int], None]  # (split, images done, images total)


@dataclass
class SplitSummary:
    split: str
    images: int
    clean_images: int
    status: str  # "ingested" | "present"


@dataclass
class IngestSummary:
    store: str
    dataset: str
    splits: list[SplitSummary] = field(default_factory=list)


def ingest(dataset: str, root: str | None, url: str, *, splits: Sequence[str] | None = None,
           storage_options: Mapping[str, Any] | None = None, progress: Progress | None = None,
           workers: int = 2, options: Mapping[str, Any] | None = None) -> IngestSummary:
    """Write the pairs of ``dataset`` found under ``root`` into the store at ``url``.

    Every split is listed and paired before the store is touched, so a layout or pairing problem
    changes nothing. Splits already complete in the store are kept (their ids must match).
    ``options`` are the dataset's own (Gaussian denoising sets: sigma, noise, seed).
    """
    from .datasets import get_dataset

    ds = get_dataset(dataset, **dict(options or {}))
    pairs_by_split = list_pairs(ds, root, splits)
    store = create_store(url, dataset=ds.name, metric=ds.metric, storage_options=storage_options,
                         options=ds.options() if hasattr(ds, "options") else {})
    if store.dataset != ds.name:
        raise StoreError(f"Store {url} holds dataset '{store.dataset}', not '{ds.name}'; use one store per dataset.")
    summary = IngestSummary(store=str(url), dataset=ds.name)
    for split, pairs in pairs_by_split.items():
        if split in store.splits:
            have = store[split]
            if have.ids != [p.id for p in pairs]:
                raise StoreError(f"Store {url} already holds split '{split}' with other images "
                                 f"({len(have)} stored vs {len(pairs)} found); use a new --store.")
            summary.splits.append(SplitSummary(split, len(have), len(set(have.gt_keys)), "present"))
            continue
        ingest_split(store, split, pairs, progress=progress, workers=workers)
        done = store[split]
        summary.splits.append(SplitSummary(split, len(done), len(done.gt_keys), "ingested"))
    return summary


def list_pairs(ds, root: str | None, splits: Sequence[str] | None) -> dict[str, list["Pair"]]:
    """Pairs per split; with ``splits`` None, every split the dataset has under ``root``."""
    if getattr(ds, "needs_root", True) and root is None:
        raise DatasetError(f"Dataset '{ds.name}' needs --root pointing at the downloaded folder.")
    wanted = list(splits) if splits else list(available_splits(ds, root))
    if not wanted:
        raise DatasetError(f"No split of '{ds.name}' found under {root}; expected layout:\n{ds.layout}")
    unknown = [s for s in wanted if s not in ds.splits]
    if unknown:
        raise DatasetError(f"Dataset '{ds.name}' has no split '{unknown[0]}' (it has: {', '.join(ds.splits)}).")
    out = {}
    for split in wanted:
        pairs = ds.pairs(root, split)
        if not pairs:
            raise DatasetError(f"Split '{split}' of '{ds.name}' under {root} holds no images.")
        ids = [p.id for p in pairs]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DatasetError(f"Image id '{dup}' appears twice in split '{split}' of '{ds.name}'.")
        out[split] = pairs
    return out


def available_splits(ds, root: str | None) -> Iterable[str]:
    finder = getattr(ds, "available_splits", None)
    if finder is not None:
        return finder(root)
    return ds.splits


def _probe(ref) -> tuple[int, int] | None:
    size = getattr(ref, "size", None)
    if callable(size):
        try:
            return tuple(int(v) for v in size())
        except TdrError:
            raise
        except Exception:
            return None
    return None


def ingest_split(store: Store, split: str, pairs: Sequence["Pair"], *, progress: Progress | None = None,
                 workers: int = 2) -> None:
    """Write one split; on any failure the partially written split is deleted and the error re-raised."""
    group = store.group
    if split in group:  # an earlier ingest of this split was interrupted
        del group[split]
    try:
        _write_split(store, split, pairs, progress, workers)
    except BaseException:
        if split in group:
            del group[split]
        raise


def _write_split(store: Store, split: str, pairs: Sequence["Pair"], progress, workers: int) -> None:
    gt_keys: list[str] = []
    gt_refs = []
    gt_row: dict[str, int] = {}
    gt_index = np.full(len(pairs), -1, dtype=np.int32)
    for i, p in enumerate(pairs):
        if p.gt is None:
            continue
        if p.gt_key not in gt_row:
            gt_row[p.gt_key] = len(gt_keys)
            gt_keys.append(p.gt_key)
            gt_refs.append(p.gt)
        gt_index[i] = gt_row[p.gt_key]

    # 1. sizes (file headers where the reference can tell, else a decode) → padded array shape
    first = pairs[0].lq.load()
    dtype, channels = first.dtype, first.shape[2]
    lq_sizes = np.array([_probe(p.lq) or (-1, -1) for p in pairs], dtype=np.int64)
    gt_sizes = np.array([_probe(r) or (-1, -1) for r in gt_refs], dtype=np.int64).reshape(-1, 2)
    if (lq_sizes < 0).any() or (gt_sizes < 0).any():
        lq_sizes, gt_sizes = _decode_sizes(pairs, gt_refs, workers)
    for i, p in enumerate(pairs):
        if gt_index[i] >= 0 and tuple(lq_sizes[i]) != tuple(gt_sizes[gt_index[i]]):
            h, w = lq_sizes[i]
            gh, gw = gt_sizes[gt_index[i]]
            raise DatasetError(f"Size mismatch for '{p.id}': degraded {w}×{h} but clean {gw}×{gh} "
                               f"({getattr(p.gt, 'path', p.gt_key)}).")
    tile = store.tile
    all_sizes = np.concatenate([lq_sizes, gt_sizes]) if len(gt_sizes) else lq_sizes
    hs = math.ceil(all_sizes[:, 0].max() / tile) * tile
    ws = math.ceil(all_sizes[:, 1].max() / tile) * tile

    # 2. arrays
    g = store.group.create_group(split, attributes={
        "ids": [p.id for p in pairs], "gt_keys": gt_keys, "complete": False,
        "channels": int(channels), "dtype": str(dtype)})

    def images(name: str, n: int):
        return g.create_array(name, shape=(n, hs, ws, channels), dtype=dtype, chunks=(1, tile, tile, channels),
                              shards=(1, hs, ws, channels), compressors=_COMPRESSORS, fill_value=0,
                              dimension_names=("image", "y", "x", "c"))

    lq = images("lq", len(pairs))
    gt = images("gt", len(gt_refs)) if gt_refs else None
    g.create_array("lq_size", data=lq_sizes.astype(np.int32), chunks=(max(len(pairs), 1), 2))
    g.create_array("gt_size", data=gt_sizes.astype(np.int32).reshape(-1, 2), chunks=(max(len(gt_refs), 1), 2))
    g.create_array("gt_index", data=gt_index, chunks=(max(len(pairs), 1),))
    lq_sha = np.zeros((len(pairs), 32), np.uint8)
    gt_sha = np.zeros((len(gt_refs), 32), np.uint8)

    # 3. decode (threads; decoders release the GIL) and write one whole shard per image
    jobs = [("lq", i, p.lq, p.id) for i, p in enumerate(pairs)] + [("gt", j, r, gt_keys[j]) for j, r in enumerate(gt_refs)]
    total = len(jobs)
    for done, ((kind, row, _, name), img) in enumerate(zip(jobs, bounded_map(lambda job: job[2].load(), jobs, workers)), 1):
        sizes = lq_sizes if kind == "lq" else gt_sizes
        if img.shape[:2] != tuple(sizes[row]) or img.dtype != dtype or img.shape[2] != channels:
            raise DatasetError(f"Image '{name}' decodes to {img.shape} {img.dtype}, expected "
                               f"{tuple(sizes[row])} {dtype} like the rest of split '{split}'.")
        h, w = img.shape[:2]
        (lq if kind == "lq" else gt)[row, :h, :w, :] = img
        (lq_sha if kind == "lq" else gt_sha)[row] = np.frombuffer(pixel_sha256(img), np.uint8)
        if progress:
            progress(split, done, total)
    g.create_array("lq_sha", data=lq_sha, chunks=(max(len(pairs), 1), 32))
    g.create_array("gt_sha", data=gt_sha, chunks=(max(len(gt_refs), 1), 32))
    g.attrs["complete"] = True


def _decode_sizes(pairs, gt_refs, workers):
    lq = np.array(list(bounded_map(lambda p: p.lq.load().shape[:2], pairs, workers)), dtype=np.int64)
    gt = np.array(list(bounded_map(lambda r: r.load().shape[:2], gt_refs, workers)), dtype=np.int64)
    return lq, gt.reshape(-1, 2)


def bounded_map(fn, items: Sequence, workers: int, depth: int | None = None):
    """``map(fn, items)`` on a thread pool, in order, with at most ``depth`` results in flight."""
    depth = depth or 2 * max(1, workers)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

