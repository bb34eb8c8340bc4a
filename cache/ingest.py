"""Ingest a dataset (folder layout → pairs) into a guidance store.

Degraded and clean images are stored losslessly in spatial tiles (one shard per image), so a training
crop reads only the tiles it covers. A clean image shared by many degraded images (SOTS, DDN) is stored
once. A split is marked ``complete`` only after every image is written; until then readers do not see
it, and a later ingest of the same images continues it (an interrupted one is rewritten).

Several processes may ingest the same split into the same new store at once (two generation jobs
pointed at one new shared path): each creates what is missing, a process that finds a group or array
already made opens it and checks it describes the same images, and both write the same bytes.

Re-ingesting a complete split re-reads the dataset and compares every image with the sha256 the store
recorded: changed pixels under an existing id are refused, and damaged stored images (a missing or
corrupt shard) are reported, or with ``repair`` rewritten from the dataset folder.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import zarr

from ..errors import DataIntegrityError, DatasetError, StoreError, TdrError
from .store import _COMPRESSORS, Store, create_store, pixel_sha256

SSIM_WINDOW = 11  # the metrics' Gaussian SSIM window (guided/metrics.py): images need this side after cropping


def min_side(metric: Mapping[str, Any]) -> int:
    """Smallest image side the dataset's metric convention can score: the SSIM window plus the border crop."""
    return SSIM_WINDOW + 2 * int(metric.get("crop_border", 0) or 0)

if TYPE_CHECKING:
    from .datasets import Pair

Progress = Callable[[str, int, int], None]  # (split, images done, images total)


@dataclass
class SplitSummary:
    split: str
    images: int
    clean_images: int
    status: str  # "ingested" | "present" | "repaired"
    repaired: int = 0  # images rewritten by --repair


@dataclass
class IngestSummary:
    store: str
    dataset: str
    splits: list[SplitSummary] = field(default_factory=list)


def ingest(dataset: str, root: str | None, url: str, *, splits: Sequence[str] | None = None,
           storage_options: Mapping[str, Any] | None = None, progress: Progress | None = None,
           workers: int = 2, options: Mapping[str, Any] | None = None, repair: bool = False) -> IngestSummary:
    """Write the pairs of ``dataset`` found under ``root`` into the store at ``url``.

    Every split is listed and paired before the store is touched, so a layout or pairing problem
    changes nothing. Splits already complete in the store are checked image by image against the
    dataset (ids, then pixels): with ``repair`` stored images that are missing or corrupt are
    rewritten from the dataset, without it they are an error. ``options`` are the dataset's own
    (Gaussian denoising sets: sigma, noise, seed).
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
                                 f"({len(have)} stored vs {len(pairs)} found); use a new store.", param="store")
            fixed = check_split(store, split, pairs, repair=repair, progress=progress, workers=workers)
            summary.splits.append(SplitSummary(split, len(have), len(set(have.gt_keys)),
                                               "repaired" if fixed else "present", fixed))
            continue
        ingest_split(store, split, pairs, progress=progress, workers=workers, min_side=min_side(ds.metric))
        done = store[split]
        summary.splits.append(SplitSummary(split, len(done), len(done.gt_keys), "ingested"))
    return summary


def check_split(store: Store, split: str, pairs: Sequence["Pair"], *, repair: bool = False,
                progress: Progress | None = None, workers: int = 2) -> int:
    """Compare a complete split with the dataset's images; rewrite damaged ones with ``repair``.

    Returns how many images were rewritten. Raises if a dataset image's pixels differ from the sha256
    the store recorded for its id (the store's guidance was made from the old pixels), or if stored
    images are missing/corrupt and ``repair`` is off.
    """
    sp = store[split]
    gt_refs: dict[int, Any] = {}
    for i, p in enumerate(pairs):
        if p.gt is not None and int(sp.gt_index[i]) >= 0:
            gt_refs.setdefault(int(sp.gt_index[i]), (p.gt, p.id))
    jobs = [("lq", i, p.lq, p.id) for i, p in enumerate(pairs)] + \
           [("gt", j, ref, name) for j, (ref, name) in sorted(gt_refs.items())]
    damaged: list[tuple[str, int, str, np.ndarray]] = []
    for done, ((part, row, _, name), img) in enumerate(
            zip(jobs, bounded_map(lambda job: job[2].load(), jobs, workers)), 1):
        if pixel_sha256(img) != sp.sha(part, row):
            kind = "degraded" if part == "lq" else "clean"
            raise StoreError(f"The {kind} image '{name}' of split '{split}' has other pixels in the dataset folder "
                             f"than in {store.url} (changed under the same id); the store's guidance was made from "
                             "the old pixels: ingest into a new store.", param="store")
        i = row if part == "lq" else sp.index(name)
        try:
            sp.read_lq(i) if part == "lq" else sp.read_gt(i)
        except DataIntegrityError:
            damaged.append((part, row, name, img))
        if progress:
            progress(split, done, len(jobs))
    if not damaged:
        return 0
    if not repair:
        part, _, name, _ = damaged[0]
        raise DataIntegrityError(
            f"{len(damaged)} stored image(s) of split '{split}' in {store.url} are missing or corrupt (first: "
            f"{'degraded' if part == 'lq' else 'clean'} '{name}'); ingest again with repair to rewrite them "
            "from the dataset folder ('tdr cache ingest --repair').", param="repair")
    store._require_writable()
    for part, row, _, img in damaged:
        arr = sp.group[part]
        padded = np.zeros(arr.shape[1:], arr.dtype)  # the whole shard: no read of the damaged one
        padded[:img.shape[0], :img.shape[1], :] = img
        arr[row] = padded
    return len(damaged)
def list_pairs(ds, root: str | None, splits: Sequence[str] | None) -> dict[str, list["Pair"]]:
    """Pairs per split; with ``splits`` None, every split the dataset has under ``root``."""
    if getattr(ds, "needs_root", True) and root is None:
        raise DatasetError(f"Dataset '{ds.name}' needs root: the downloaded folder.", param="root")
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
                 workers: int = 2, min_side: int = 1) -> None:
    """Write one split and mark it complete; safe beside another process ingesting the same split.

    On a failure the split stays unmarked (invisible to readers); the next ingest rewrites it. It is
    not deleted, since another process may be writing it at the same time.
    """
    _write_split(store, split, pairs, progress, workers, min_side)


def _write_split(store: Store, split: str, pairs: Sequence["Pair"], progress, workers: int,
                 min_side: int = 1) -> None:
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
        h, w = (int(v) for v in lq_sizes[i])
        if min(h, w) < min_side:
            raise DatasetError(f"Image '{p.id}' of split '{split}' is {w}×{h} pixels; training and the metrics "
                               f"(11-pixel SSIM window plus the dataset's border crop) need at least "
                               f"{min_side}×{min_side}: remove or enlarge it.")
        if gt_index[i] >= 0 and tuple(lq_sizes[i]) != tuple(gt_sizes[gt_index[i]]):
            gh, gw = (int(v) for v in gt_sizes[gt_index[i]])
            raise DatasetError(f"Size mismatch for '{p.id}': degraded {w}×{h} but clean {gw}×{gh} "
                               f"({getattr(p.gt, 'path', p.gt_key)}).")
    tile = store.tile
    all_sizes = np.concatenate([lq_sizes, gt_sizes]) if len(gt_sizes) else lq_sizes
    hs = math.ceil(all_sizes[:, 0].max() / tile) * tile
    ws = math.ceil(all_sizes[:, 1].max() / tile) * tile

    # 2. the split's group and arrays: created here, or opened (and compared) if another process did
    attrs = {"ids": [p.id for p in pairs], "gt_keys": gt_keys, "complete": False,
             "channels": int(channels), "dtype": str(dtype)}
    g = _require_split(store, split, attrs)
    if g is None:  # another process finished this very split meanwhile
        return

    def images(name: str, n: int):
        return _require_array(g, split, name, shape=(n, hs, ws, channels), dtype=dtype,
                              chunks=(1, tile, tile, channels), shards=(1, hs, ws, channels),
                              compressors=_COMPRESSORS, fill_value=0, dimension_names=("image", "y", "x", "c"))

    def small(name: str, data: np.ndarray) -> None:
        arr = _require_array(g, split, name, shape=data.shape, dtype=data.dtype,
                             chunks=(max(data.shape[0], 1), *data.shape[1:]))
        arr[...] = data

    lq = images("lq", len(pairs))
    gt = images("gt", len(gt_refs)) if gt_refs else None
    small("lq_size", lq_sizes.astype(np.int32))
    small("gt_size", gt_sizes.astype(np.int32).reshape(-1, 2))
    small("gt_index", gt_index)
    lq_sha = np.zeros((len(pairs), 32), np.uint8)
    gt_sha = np.zeros((len(gt_refs), 32), np.uint8)

    # 3. decode (threads; decoders release the GIL) and write one whole shard per image
    jobs = [("lq", i, p.lq, p.id) for i, p in enumerate(pairs)] + [("gt", j, r, gt_keys[j]) for j, r in enumerate(gt_refs)]
    total = len(jobs)
    for done, ((kind, row, _, name), img) in enumerate(zip(jobs, bounded_map(lambda job: job[2].load(), jobs, workers)), 1):
        sizes = lq_sizes if kind == "lq" else gt_sizes
        _check_like_split(img, name, split, tuple(int(v) for v in sizes[row]), dtype, channels)
        h, w = img.shape[:2]
        (lq if kind == "lq" else gt)[row, :h, :w, :] = img
        (lq_sha if kind == "lq" else gt_sha)[row] = np.frombuffer(pixel_sha256(img), np.uint8)
        if progress:
            progress(split, done, total)
    small("lq_sha", lq_sha)
    small("gt_sha", gt_sha)
    g.attrs["complete"] = True


def _bits(dtype) -> str:
    return f"{np.dtype(dtype).itemsize * 8}-bit"


def _check_like_split(img: np.ndarray, name: str, split: str, size: tuple[int, int], dtype, channels: int) -> None:
    """One sentence in words when an image's bit depth, size or channels differ from the split's."""
    if img.dtype != dtype:
        raise DatasetError(f"Image '{name}' is {_bits(img.dtype)} but the first image of split '{split}' is "
                           f"{_bits(dtype)}; convert the folder to one bit depth.")
    if img.shape[2] != channels:
        raise DatasetError(f"Image '{name}' has {img.shape[2]} channels but split '{split}' has {channels}.")
    if img.shape[:2] != size:
        raise DatasetError(f"Image '{name}' decodes to {img.shape[1]}×{img.shape[0]} pixels but its file header "
                           f"says {size[1]}×{size[0]}; replace the file.")


def _require_split(store: Store, split: str, attrs: dict) -> "zarr.Group | None":
    """The split's group for writing: new, or the one an interrupted or concurrent ingest of the same
    images left (another ingest's leftover of other images is replaced). None if already complete."""
    root = store.group
    for _ in range(3):
        if split in root:
            g = root[split]
            have = g.attrs.asdict()
            same = all(have.get(k) == attrs[k] for k in ("ids", "gt_keys", "channels", "dtype"))
            if have.get("complete"):
                if not same:
                    raise StoreError(f"Store {store.url} already holds split '{split}' with other images; "
                                     "use a new store.", param="store")
                return None
            if same:
                return g
            del root[split]  # an interrupted ingest of other images
        try:
            return root.create_group(split, attributes=attrs)
        except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
            continue  # another process created it a moment ago: look at what it made
    raise StoreError(f"Could not create split '{split}' in {store.url}: other processes keep replacing it.")


def _require_array(g: "zarr.Group", split: str, name: str, **spec) -> "zarr.Array":
    """Create array ``name``, or open the one another process made and check it has the same layout."""
    try:
        return g.create_array(name, **spec)
    except zarr.errors.ContainsArrayError:
        arr = g[name]
        if tuple(arr.shape) != tuple(spec["shape"]) or arr.dtype != np.dtype(spec["dtype"]):
            raise StoreError(f"Another process is writing split '{split}' with other images ('{name}' is "
                             f"{arr.shape} {arr.dtype}, expected {tuple(spec['shape'])} {np.dtype(spec['dtype'])}); "
                             "use one store per dataset and the same dataset folder.") from None
        return arr


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

