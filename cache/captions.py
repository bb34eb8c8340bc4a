"""Captions of a guidance group: the text each image's guidance was made from (the ``caption`` source).

Layout, inside a guidance group::

    guidance/<fid>/captions/<split>  (N, LENGTH) uint8   one chunk per image: UTF-8 JSON, zero padded,
                                                          {"raw": caption, "prompt": what SD got, "edited": bool}

One chunk per image, written by the writer of that image's guidance and *before* it, so guidance never
exists without the caption it was made from, and concurrent writers stay safe (zarr writes distinct chunks
independently, so writers of different images never touch the same object).

Fixing captions by hand: ``tdr cache captions STORE > captions.jsonl`` (or the ``captions.jsonl`` that
``tdr cache export`` writes beside the PNGs), edit the ``prompt`` of some lines, then
``tdr cache captions STORE --from captions.jsonl``: each changed prompt is stored (``edited``), the
guidance made from the old one is removed, and rerunning the same ``tdr generate-guidance --source caption``
regenerates exactly those images from the stored prompts. Images with equal degraded pixels share one
caption and one guidance (content addressing, :mod:`tdr.cache.merge`), so an edit applies to all of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import zarr
from zarr.core.sync import sync

from ..errors import StoreError
from .store import _COMPRESSORS, GuidanceSet, Store

LENGTH = 2048  # bytes of UTF-8 JSON per record
GROUP = "captions"
Row = tuple[str, int]


def has_captions(gs: GuidanceSet) -> bool:
    return GROUP in gs.group


def _array(gs: GuidanceSet, split: str, create: bool = False) -> zarr.Array | None:
    if GROUP in gs.group and split in gs.group[GROUP]:
        return gs.group[GROUP][split]
    if not create:
        return None
    n = len(gs.store[split])
    parent = gs.group.require_group(GROUP)
    try:
        return parent.create_array(split, shape=(n, LENGTH), dtype="uint8", chunks=(1, LENGTH),
                                   compressors=_COMPRESSORS, fill_value=0, dimension_names=("image", "byte"))
    except zarr.errors.ContainsArrayError:  # a concurrent writer created it first
        return parent[split]


def encode(record: Mapping) -> np.ndarray:
    """A caption record as (LENGTH,) uint8; StoreError if it does not fit."""
    data = json.dumps({"raw": str(record.get("raw", "")), "prompt": str(record["prompt"]),
                       "edited": bool(record.get("edited", False))}, ensure_ascii=False).encode()
    if len(data) > LENGTH:
        raise StoreError(f"A caption is too long to store ({len(data)} bytes of JSON, at most {LENGTH}): "
                         f"{str(record['prompt'])[:60]}…")
    out = np.zeros(LENGTH, np.uint8)
    out[:len(data)] = np.frombuffer(data, np.uint8)
    return out


def decode(row: np.ndarray) -> dict | None:
    data = bytes(np.asarray(row, np.uint8)).rstrip(b"\0")
    return json.loads(data.decode()) if data else None


def write(gs: GuidanceSet, split: str, i: int, record: Mapping) -> None:
    gs.store._require_writable()
    _array(gs, split, create=True)[i] = encode(record)


def read(gs: GuidanceSet, split: str, i: int) -> dict | None:
    """The caption record of image ``i``, or None if none was written."""
    arr = _array(gs, split)
    if arr is None or i not in _rows(arr):
        return None
    return decode(arr[i])


def _rows(arr: zarr.Array) -> set[int]:
    prefix = f"{arr.path}/c/"

    async def _ls() -> list[str]:
        return [k async for k in arr.store.list_prefix(prefix)]

    return {int(k[len(prefix):].split("/")[0]) for k in sync(_ls())}


def read_split(gs: GuidanceSet, split: str) -> dict[int, dict]:
    """{row: record} of every image of ``split`` that has a caption."""
    arr = _array(gs, split)
    if arr is None:
        return {}
    return {i: decode(arr[i]) for i in sorted(_rows(arr)) if i < arr.shape[0]}


def copy(src: GuidanceSet, src_row: Row, dst: GuidanceSet, dst_row: Row) -> None:
    """Copy one image's caption record, if it has one."""
    record = read(src, *src_row)
    if record is not None:
        write(dst, dst_row[0], dst_row[1], record)


def records(gs: GuidanceSet, splits: Iterable[str] | None = None) -> list[dict]:
    """Every caption as ``{"split", "id", "raw", "prompt", "edited"}``, in split and row order."""
    out = []
    for split in splits or gs.store.splits:
        if split not in gs.store.splits:
            continue
        ids = gs.store[split].ids
        out += [{"split": split, "id": ids[i], **rec} for i, rec in read_split(gs, split).items()]
    return out


def write_jsonl(rows: Iterable[Mapping], path: str | Path) -> int:
    """Write records one JSON object per line; returns how many."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a captions.jsonl file; StoreError naming the first bad line."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise StoreError(f"Cannot read {path} ({exc.strerror or type(exc).__name__}).") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("split", "id", "prompt")):
                raise ValueError
        except ValueError:
            raise StoreError(f"{path} line {n} is not a caption record "
                             '({"split": …, "id": …, "prompt": …}).') from None
        out.append(rec)
    return out


def list_captions(store: Store, group: str | None = None, splits: Iterable[str] | None = None) -> list[dict]:
    """The caption records (see :func:`records`) of guidance group ``group`` (default: the store's);
    StoreError if that group holds no captions."""
    gs = store.guidance(group)
    if not has_captions(gs):
        raise StoreError(f"Guidance group {gs.id} has no captions (only the caption source stores them).",
                         param="group")
    return records(gs, splits)


@dataclass
class EditSummary:
    changed: list[str] = field(default_factory=list)   # "split/id" of images whose prompt changed
    unchanged: int = 0
    invalidated: int = 0                                # guidance chunks removed (changed images + equal pixels)
    group: str = ""                                     # the guidance group edited


def import_edits(store: Store, paths: Iterable[str | Path], *, group: str | None = None,
                 splits: Iterable[str] | None = None) -> EditSummary:
    """Store the prompts of captions.jsonl files ``paths`` (only records of ``splits``, if given) in
    guidance group ``group`` (default: the store's), as :func:`apply_edits` does."""
    gs = store.guidance(group)
    edits = [rec for path in paths for rec in read_jsonl(path)]
    if splits:
        edits = [rec for rec in edits if rec["split"] in set(splits)]
    return apply_edits(store, gs, edits)


def apply_edits(store: Store, gs: GuidanceSet, edits: Iterable[Mapping]) -> EditSummary:
    """Store hand-edited prompts and remove the guidance made from the old ones (see the module docstring).

    Every record is checked before anything changes: an unknown split or id, or an image that has no
    caption in this group, is an error and nothing is written.
    """
    from .merge import rows_by_content

    plan: list[tuple[Row, dict]] = []
    summary = EditSummary(group=gs.id)
    for rec in edits:
        split, image_id = rec["split"], rec["id"]
        row = (split, store[split].index(image_id))
        old = read(gs, *row)
        if old is None:
            raise StoreError(f"Image '{image_id}' of split '{split}' has no caption in guidance group {gs.id}; "
                             "generate it with the caption source ('tdr generate-guidance --source caption') first.")
        prompt = " ".join(str(rec["prompt"]).split())
        if not prompt:
            raise StoreError(f"The new prompt of '{split}/{image_id}' is empty.")
        if prompt == old["prompt"]:
            summary.unchanged += 1
            continue
        new = {"raw": old.get("raw", ""), "prompt": prompt, "edited": True}
        encode(new)  # too long: refused before anything is written
        plan.append((row, new))
        summary.changed.append(f"{split}/{image_id}")
    if not plan:
        return summary
    every = [(s, i) for s in store.splits for i in range(len(store[s]))]
    by_content = rows_by_content(store, every)
    sha_of = {r: sha for sha, rows in by_content.items() for r in rows}
    for row, new in plan:
        for target in by_content[sha_of[row]]:
            # guidance first: a run killed in between leaves the old prompt and no guidance, never
            # guidance that disagrees with its stored prompt
            if target[0] in gs.group and _delete_chunk(gs.group[target[0]], target[1]):
                summary.invalidated += 1
            write(gs, target[0], target[1], new)
    return summary


def _delete_chunk(arr: zarr.Array, i: int) -> bool:
    """Remove guidance image ``i`` (its one chunk); True if there was one."""
    key = f"{arr.path}/c/{i}/" + "/".join("0" * (arr.ndim - 1))

    async def _delete() -> bool:
        if not await arr.store.exists(key):
            return False
        await arr.store.delete(key)
        return True

    return sync(_delete())
