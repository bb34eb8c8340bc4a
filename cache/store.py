"""The guidance cache: one Zarr v3 store per dataset, the contract between generation and training.

Layout (schema 1)::

    zarr.json                      attrs: tdr_schema, dataset, metric, tile, guidance_default
    <split>/                       attrs: ids, gt_keys, complete, channels, dtype
    <split>/lq        (N, Hs, Ws, C) uint8|uint16   degraded images, top-left aligned, zero padded;
                                                     one shard per image, inner chunks TILE×TILE
    <split>/gt        (M, Hs, Ws, C)                 clean images, each stored once (M ≤ N)
    <split>/lq_size   (N, 2) int32                   true (h, w) of each degraded image
    <split>/gt_size   (M, 2) int32
    <split>/gt_index  (N,)   int32                   row of ``gt`` for each degraded image, -1 if none
    <split>/lq_sha    (N, 32) uint8                  sha256 of the degraded pixels (content address)
    <split>/gt_sha    (M, 32) uint8
    guidance/<fid>/                attrs: fingerprint, size, created, provenance
    guidance/<fid>/<split> (N, S, S, 3) uint8        one chunk per image, written by exactly one writer

``fid`` is :func:`tdr.cache.fingerprint.fingerprint_id` of the fingerprint. ``provenance`` says how a group's
pixels relate to the degraded images (``PROVENANCES``): ``generated`` (written by generate-guidance: same
content, no shared pixel geometry), ``aligned`` (declared at import: the geometry follows the input, e.g.
registered reference photos), ``unknown`` (imported without the declaration; groups written before the
attribute existed read as this). The fingerprint's ``layout`` (``LAYOUTS``, default "center") says which
rectangle of the frame a guidance image is about: the centre square of the short side, or the full frame. Every chunk ends with a
CRC32C checksum. Readers never take a missing chunk for zeros: an image whose shard (or guidance chunk)
is absent, or whose chunk fails its checksum, raises :class:`DataIntegrityError` naming the image, its
split and the command that repairs it; whole-image reads also re-check the image's sha256. An image's guidance is *done* when its chunk exists and its checksum passes, so a
killed job resumes by skipping done images and concurrent writers need no lock (zarr writes distinct
chunks independently; guidance is never sharded, so no two images share a chunk).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from typing import Any, Mapping

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from ..errors import ConfigError, DataIntegrityError, FingerprintMismatch, StoreError, StoreNotFoundError
from .fingerprint import describe_difference, fingerprint_id
from .layout import LAYOUTS  # noqa: F401  (a store's layouts; defined with the layout geometry)

SCHEMA = 1
TILE = 128
GUIDANCE_SIZE = 512
PROVENANCES = ("generated", "aligned", "unknown")
_COMPRESSORS = (ZstdCodec(level=3), Crc32cCodec())


def pixel_sha256(img: np.ndarray) -> bytes:
    """sha256 over shape, dtype and pixels of an (H, W, C) image: the content address of an image."""
    img = np.ascontiguousarray(img)
    h = hashlib.sha256(f"{img.shape}:{img.dtype.str}:".encode())
    h.update(img.tobytes())
    return h.digest()


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def open_store(url: str, mode: str = "r", storage_options: Mapping[str, Any] | None = None) -> "Store":
    """Open an existing tdr store (local path or fsspec URL); ``mode`` "r" reads, "a" also writes."""
    if mode not in ("r", "a"):
        raise ConfigError(f"mode must be 'r' or 'a', not {mode!r}.")
    storage_options = _storage_options(url, storage_options)
    try:
        group = zarr.open_group(str(url), mode="r" if mode == "r" else "r+", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        raise StoreNotFoundError(f"No tdr store at {url}; create one by ingesting a dataset into it "
                                 "('tdr cache ingest').") from None
    except Exception as exc:  # network, credentials, malformed metadata
        raise StoreError(f"Cannot open store {url}: {_one_line(exc)}.") from None
    return Store(group, url, read_only=(mode == "r"))


def _storage_options(url: str, given: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """fsspec options for a remote ``url``: those given, else ``$TDR_STORAGE_OPTIONS`` (cache/options.py)."""
    if given:
        return dict(given)
    if "://" not in str(url):
        return None
    from .options import parse_storage_options

    return parse_storage_options()


def create_store(url: str, *, dataset: str, metric: Mapping[str, Any],
                 storage_options: Mapping[str, Any] | None = None,
                 options: Mapping[str, Any] | None = None) -> "Store":
    """Open the store at ``url`` for writing, creating it (for ``dataset``) if it does not exist.

    Safe when several processes create the same new store at once: the root metadata is written in one
    put (with its attributes), and a process that loses the race opens what the winner made; the
    caller then checks it holds the same dataset.
    """
    try:
        return open_store(url, "a", storage_options)
    except StoreNotFoundError:
        pass
    attributes = {"tdr_schema": SCHEMA, "dataset": dataset, "metric": dict(metric), "tile": TILE,
                  "dataset_options": dict(options or {}), "created": _utc_now(), "guidance_default": None}
    try:
        group = zarr.open_group(str(url), mode="w-", attributes=attributes,
                                storage_options=_storage_options(url, storage_options))
    except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError):
        return open_store(url, "a", storage_options)  # another process created it a moment ago
    except Exception as exc:
        raise StoreError(f"Cannot create store {url}: {_one_line(exc)}.") from None
    return Store(group, url, read_only=False)


def _chunk_error(exc: BaseException) -> str:
    """A decoding failure in words (zarr's checksum message carries raw bytes)."""
    text = _one_line(exc)
    return "is corrupt (fails its CRC32C checksum)" if "checksum" in text.lower() else f"is corrupt ({text})"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__).rstrip(".")


class Store:
    """A tdr guidance store. Use :func:`open_store` / :func:`create_store` to get one."""

    def __init__(self, group: zarr.Group, url: str, read_only: bool):
        self.group = group
        self.url = str(url)
        self.read_only = read_only
        schema = group.attrs.get("tdr_schema")
        if schema is None:
            raise StoreError(f"{self.url} is a Zarr store but not a tdr store (no 'tdr_schema' attribute); "
                             "use a new, empty location.")
        if schema != SCHEMA:
            raise StoreError(f"{self.url} was written with tdr store schema {schema}, this tdr reads schema "
                             f"{SCHEMA}; use a matching tdr version or re-create the store.")

    # ---- store-level facts -------------------------------------------------------------------
    @property
    def dataset(self) -> str:
        return self.group.attrs["dataset"]

    @property
    def metric(self) -> dict:
        return dict(self.group.attrs.get("metric", {}))

    @property
    def tile(self) -> int:
        return int(self.group.attrs.get("tile", TILE))

    @property
    def splits(self) -> list[str]:
        """Splits whose ingestion finished."""
        names = []
        for name in sorted(self.group.group_keys()):
            if name == "guidance":
                continue
            if self.group[name].attrs.get("complete"):
                names.append(name)
        return names

    @property
    def unfinished_splits(self) -> list[str]:
        """Splits whose ingestion started but never finished (a killed or still running ingest)."""
        return [name for name in sorted(self.group.group_keys())
                if name != "guidance" and not self.group[name].attrs.get("complete")]

    def __contains__(self, split: str) -> bool:
        return split in self.splits

    def __getitem__(self, split: str) -> "Split":
        if split not in self.splits:
            have = ", ".join(self.splits) or "none"
            raise StoreError(f"Store {self.url} has no split '{split}' (it has: {have}).")
        return Split(self.group[split], split, url=self.url)

    def nbytes(self, prefix: str = "") -> int:
        """Bytes stored under ``prefix`` (relative to the store root)."""
        base = f"{self.group.path}/" if self.group.path else ""
        try:
            return int(sync(self.group.store.getsize_prefix(base + prefix)))
        except Exception:
            return -1

    # ---- guidance groups ---------------------------------------------------------------------
    def guidance_ids(self) -> list[str]:
        if "guidance" not in self.group:
            return []
        return sorted(self.group["guidance"].group_keys())

    def guidance(self, gid: str | None = None) -> "GuidanceSet":
        """The guidance group ``gid`` (default: the store's default group) for reading."""
        ids = self.guidance_ids()
        if not ids:
            raise StoreError(f"Store {self.url} holds no guidance yet; run 'tdr generate-guidance' or "
                             "'tdr cache import-guidance' first.")
        if gid is None:
            gid = self.group.attrs.get("guidance_default") or ids[-1]
        matches = [i for i in ids if i.startswith(gid)]
        if len(matches) != 1:
            raise StoreError(f"Store {self.url} has no single guidance group '{gid}' (it has: {', '.join(ids)}).")
        return GuidanceSet(self, self.group["guidance"][matches[0]], matches[0])

    def guidance_for(self, fingerprint: Mapping[str, Any], *, size: int = GUIDANCE_SIZE,
                     provenance: str = "unknown", force: bool = False) -> "GuidanceSet":
        """The guidance group for ``fingerprint``, created if needed, for writing; ``provenance`` (one of
        ``PROVENANCES``) is recorded on a new group, and on an existing one that lacks it.

        Refuses (``FingerprintMismatch``) when the store already holds guidance made with other settings,
        unless ``force``, which adds a second group beside the first and makes it the default.
        """
        self._require_writable()
        if provenance not in PROVENANCES:
            raise ConfigError(f"provenance must be one of {', '.join(PROVENANCES)}, not {provenance!r}.")
        fingerprint = dict(fingerprint, size=int(size))
        gid = fingerprint_id(fingerprint)
        ids = self.guidance_ids()
        if gid in ids:
            group = self.group["guidance"][gid]
            if "provenance" not in group.attrs:
                group.attrs["provenance"] = provenance
            return GuidanceSet(self, group, gid)
        if ids and not force:
            current = self.guidance()
            raise FingerprintMismatch(
                f"Store {self.url} holds guidance made with other settings "
                f"({describe_difference(current.fingerprint, fingerprint)}); use a new store, or pass "
                "force to add a second guidance group to this store.", param="force")
        parent = self.group.require_group("guidance")
        try:
            sub = parent.create_group(gid, attributes={"fingerprint": fingerprint, "size": int(size),
                                                       "created": _utc_now(), "provenance": provenance})
        except zarr.errors.ContainsGroupError:  # a concurrent writer created it first
            sub = parent[gid]
        if not self.group.attrs.get("guidance_default") or force:
            self.group.attrs["guidance_default"] = gid
        return GuidanceSet(self, sub, gid)

    def _require_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"Store {self.url} was opened read-only.")


def _chunk_rows(arr: zarr.Array) -> set[int]:
    """Rows (first index) of ``arr`` with at least one chunk/shard object in the store (one listing)."""
    prefix = f"{arr.path}/c/"

    async def _ls() -> list[str]:
        return [k async for k in arr.store.list_prefix(prefix)]

    rows = set()
    for key in sync(_ls()):
        parts = key[len(prefix):].split("/")
        if len(parts) == arr.ndim and parts[0].isdigit():
            rows.add(int(parts[0]))
    return rows


class Split:
    """One split of a store: degraded/clean images with ids and true sizes.

    Every read checks that the image's shard exists (a deleted shard would otherwise read as zeros)
    and that its chunks pass their CRC32C; a whole-image read also compares the pixels' sha256 with
    the one recorded at ingest. A failure is a :class:`DataIntegrityError` naming image, split and the
    repairing command.
    """

    def __init__(self, group: zarr.Group, name: str, url: str = ""):
        self.group = group
        self.name = name
        self.url = url
        attrs = group.attrs.asdict()
        self.ids: list[str] = list(attrs["ids"])
        self.gt_keys: list[str] = list(attrs.get("gt_keys", []))
        self.lq_sizes = np.asarray(group["lq_size"][...], dtype=np.int64)   # (N, 2) h, w
        self.gt_index = np.asarray(group["gt_index"][...], dtype=np.int64)  # (N,)
        self.gt_sizes = np.asarray(group["gt_size"][...], dtype=np.int64) if "gt_size" in group else np.zeros((0, 2), np.int64)
        self._lq = group["lq"]
        self._gt = group["gt"] if "gt" in group else None
        self._index = {k: i for i, k in enumerate(self.ids)}
        self._present: dict[str, set[int]] = {}  # "lq"/"gt" → rows whose shard exists (listed once)
        self._sha: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dtype(self) -> np.dtype:
        return self._lq.dtype

    @property
    def has_gt(self) -> bool:
        return self._gt is not None and bool((self.gt_index >= 0).any())

    def index(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise StoreError(f"Split '{self.name}' has no image with id '{image_id}'.") from None

    def lq_size(self, i: int) -> tuple[int, int]:
        h, w = self.lq_sizes[i]
        return int(h), int(w)

    def gt_size(self, i: int) -> tuple[int, int]:
        h, w = self.gt_sizes[self.gt_index[i]]
        return int(h), int(w)

    def read_lq(self, i: int, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Degraded image ``i`` (H, W, C), or the crop ``box = (top, left, height, width)`` of it."""
        return self._read("lq", i, i, self.lq_size(i), box)

    def read_gt(self, i: int, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Clean image belonging to degraded image ``i`` (or its crop ``box``)."""
        j = int(self.gt_index[i])
        if j < 0 or self._gt is None:
            raise StoreError(f"Image '{self.ids[i]}' of split '{self.name}' has no clean image.")
        h, w = self.gt_sizes[j]
        return self._read("gt", i, j, (int(h), int(w)), box)

    def _read(self, part: str, i: int, row: int, size: tuple[int, int], box) -> np.ndarray:
        h, w = size
        arr = self._lq if part == "lq" else self._gt
        if box is not None:
            top, left, bh, bw = box
            if top < 0 or left < 0 or top + bh > h or left + bw > w:
                raise ValueError(f"crop {box} outside image of size {size}")
        if part not in self._present:
            self._present[part] = _chunk_rows(arr)
        if row not in self._present[part] and not self._blank(part, row, size, arr.dtype, arr.shape[-1]):
            raise self._damaged(part, i, "its data is missing from the store")
        try:
            if box is None:
                img = arr[row, :h, :w, :]
            else:
                top, left, bh, bw = box
                img = arr[row, top:top + bh, left:left + bw, :]
        except Exception as exc:  # zarr: "Stored and computed checksum do not match", truncated shard
            raise self._damaged(part, i, f"a chunk of it {_chunk_error(exc)}") from None
        if box is None and pixel_sha256(img) != self.sha(part, row):
            raise self._damaged(part, i, "its pixels differ from those recorded at ingest")
        return img

    def sha(self, part: str, row: int) -> bytes:
        """sha256 recorded at ingest for row ``row`` of ``part`` ("lq" or "gt")."""
        if part not in self._sha:
            self._sha[part] = np.asarray(self.group[f"{part}_sha"][...], np.uint8)
        return bytes(self._sha[part][row])

    def _blank(self, part: str, row: int, size: tuple[int, int], dtype, channels: int) -> bool:
        """True if the image was all zeros at ingest (zarr writes no shard for it)."""
        return pixel_sha256(np.zeros((*size, channels), dtype)) == self.sha(part, row)

    def _damaged(self, part: str, i: int, what: str) -> DataIntegrityError:
        kind = "degraded" if part == "lq" else "clean"
        store = f" of {self.url}" if self.url else ""
        return DataIntegrityError(
            f"The {kind} image '{self.ids[i]}' of split '{self.name}'{store} cannot be read: {what}; "
            f"restore it with 'tdr cache ingest --repair' (same dataset, root and store), then "
            f"check with 'tdr cache verify'.", what)

    def lq_sha(self, i: int | None = None) -> np.ndarray:
        data = self.group["lq_sha"]
        return data[...] if i is None else data[i]


class GuidanceSet:
    """One guidance group: guidance images made under one fingerprint, per split."""

    def __init__(self, store: Store, group: zarr.Group, gid: str):
        self.store = store
        self.group = group
        self.id = gid
        self.fingerprint: dict = dict(group.attrs["fingerprint"])
        self.size: int = int(group.attrs.get("size", GUIDANCE_SIZE))
        recorded = group.attrs.get("provenance")
        self.provenance: str = recorded if recorded in PROVENANCES else "unknown"
        self.layout: str = self.fingerprint.get("layout", "center")

    def array(self, split: str, *, create: bool = False) -> zarr.Array:
        """The (N, S, S, 3) guidance array of ``split``; all-zero images are still written as chunks."""
        if split in self.group:
            return self.group[split].with_config({"write_empty_chunks": True})
        if not create:
            raise StoreError(f"Guidance group {self.id} has nothing for split '{split}' yet.")
        n = len(self.store[split])
        try:
            return self.group.create_array(
                split, shape=(n, self.size, self.size, 3), dtype="uint8",
                chunks=(1, self.size, self.size, 3), compressors=_COMPRESSORS, fill_value=0,
                config={"write_empty_chunks": True}, dimension_names=("image", "y", "x", "c"))
        except zarr.errors.ContainsArrayError:  # a concurrent writer created it first
            return self.group[split].with_config({"write_empty_chunks": True})

    def _chunk_keys(self, split: str) -> set[int]:
        """Rows whose chunk object exists (not yet checksum-verified)."""
        if split not in self.group:
            return set()
        return _chunk_rows(self.group[split])

    def done(self, split: str, *, check: bool = True) -> np.ndarray:
        """(N,) bool: guidance of image i exists and (with ``check``) its checksum passes."""
        n = len(self.store[split])
        out = np.zeros(n, dtype=bool)
        rows = self._chunk_keys(split)
        if not rows:
            return out
        arr = self.group[split]
        for i in sorted(rows):
            if i >= n:
                continue
            if not check:
                out[i] = True
                continue
            try:
                arr[i]
                out[i] = True
            except Exception:
                out[i] = False
        return out

    def write(self, split: str, i: int, image: np.ndarray) -> None:
        """Store the guidance (S, S, 3) uint8 of image ``i`` as one chunk."""
        self.store._require_writable()
        image = np.asarray(image)
        if image.shape != (self.size, self.size, 3) or image.dtype != np.uint8:
            raise ValueError(f"guidance must be ({self.size}, {self.size}, 3) uint8, got {image.shape} {image.dtype}")
        self.array(split, create=True)[i] = image

    def read(self, split: str, i: int) -> np.ndarray:
        """Guidance (S, S, 3) uint8 of image ``i``; DataIntegrityError if missing or corrupt."""
        arrays = self.__dict__.setdefault("_arrays", {})
        if split not in arrays:
            arrays[split] = self.array(split)
        if i not in self._chunk_rows_cached(split):
            raise self._damaged(split, i, "it is missing (never written, or its chunk was deleted)")
        try:
            return arrays[split][i]
        except Exception as exc:  # checksum mismatch, truncated chunk
            raise self._damaged(split, i, f"its chunk {_chunk_error(exc)}") from None

    def _damaged(self, split: str, i: int, what: str) -> DataIntegrityError:
        ids = self.store[split].ids
        fix = ("import it again with 'tdr cache import-guidance'" if self.fingerprint.get("kind") == "imported"
               else "re-run 'tdr generate-guidance' with the same settings (it regenerates only such images)")
        return DataIntegrityError(f"Guidance of image '{ids[i]}' of split '{split}' (group {self.id}) cannot be "
                                  f"read: {what}; {fix}.", what)

    def _chunk_rows_cached(self, split: str) -> set[int]:
        cache = self.__dict__.setdefault("_rows", {})
        if split not in cache:
            cache[split] = self._chunk_keys(split)
        return cache[split]
