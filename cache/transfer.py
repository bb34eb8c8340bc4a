"""Guidance in and out of a store as ordinary image files named by image id.

A file belongs to an image only by its exact id: ``<folder>/<id>.<ext>``, where an id with ``/``
(GoPro ``GOPR0384_11_00/000001``, RealBlur ``scene1/blur/blur_1``) is a nested path, or the flat
form with every ``/`` written as ``_`` (``GOPR0384_11_00_000001.png``). Export writes the nested
form. Nothing is matched by a bare file name, so two images never share one file; an id with more
than one matching file is refused, and files that match no id are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import captions
from ..errors import StoreError
from .images import IMAGE_SUFFIXES, read_image, resize_square, to_uint8, write_png
from .ingest import bounded_map
from .layout import check_layout
from .store import Store

IMPORTED_FINGERPRINT = {"kind": "imported"}  # plus provenance/layout/label where not the defaults


FLAT_SEPARATOR = "_"  # stands for "/" in flat file names of nested ids (a clash is refused)


@dataclass
class TransferSummary:
    written: int
    missing: list[str]
    group: str
    unused: list[str] = field(default_factory=list)  # files (relative to the folder) that match no image id


def _image_files(folder: Path) -> dict[str, list[Path]]:
    """Image files under ``folder`` (any depth) by their path without extension, '/'-separated."""
    files: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            files.setdefault(path.relative_to(folder).with_suffix("").as_posix(), []).append(path)
    return files


def match_files(folder: Path, ids: list[str]) -> tuple[dict[int, Path], list[str], list[str]]:
    """(row → file, ids without a file, unused files) by exact id; ambiguity is a StoreError."""
    files = _image_files(folder)
    found: dict[int, Path] = {}
    owner: dict[Path, str] = {}
    missing = []
    for i, image_id in enumerate(ids):
        names = dict.fromkeys([image_id, image_id.replace("/", FLAT_SEPARATOR)])
        hits = [p for name in names for p in files.get(name, [])]
        if not hits:
            missing.append(image_id)
            continue
        if len(hits) > 1:
            shown = ", ".join(p.relative_to(folder).as_posix() for p in hits)
            raise StoreError(f"Image '{image_id}' matches several files in {folder} ({shown}); keep one.")
        if hits[0] in owner:
            raise StoreError(f"File {hits[0].relative_to(folder).as_posix()} in {folder} matches two image ids, "
                             f"'{owner[hits[0]]}' and '{image_id}'; name it by the nested path of one of them.")
        owner[hits[0]] = image_id
        found[i] = hits[0]
    unused = [p.relative_to(folder).as_posix() for paths in files.values() for p in paths if p not in owner]
    return found, missing, unused


def _to_guidance(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8/uint16 → (size, size, 3) uint8, bicubic."""
    return np.ascontiguousarray(resize_square(to_uint8(img), size)[..., :3])


def imported_fingerprint(*, aligned: bool = False, layout: str = "center", label: str | None = None) -> dict:
    """Fingerprint of an imported guidance group. Imports declared differently (aligned or not, the
    layout, a label naming the source) are different groups; the defaults give the fingerprint that
    imports had before these settings existed, so such groups are continued, not duplicated."""
    check_layout(layout)
    fp = dict(IMPORTED_FINGERPRINT)
    if aligned:
        fp["provenance"] = "aligned"
    if layout != "center":
        fp["layout"] = layout
    if label:
        fp["label"] = str(label)
    return fp


def import_guidance(store: Store, split: str, folder: str | Path, *, aligned: bool = False,
                    layout: str = "center", label: str | None = None, force: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> TransferSummary:
    """Import a folder of guidance images named by image id into a guidance group marked "imported".

    ``aligned``: the files' geometry follows the degraded images (registered reference photos, the
    aligned-content stand-in), recorded as provenance ``aligned``; otherwise ``unknown``, which the
    trainer treats like generated guidance (global matching). ``layout``: what each file shows — the
    frame's centre square ("center", as the paper's scripts write) or the whole frame ("full").
    ``label`` names the source, so several imports can live side by side as separate groups.
    Every file is decoded before anything is written, so an unreadable file changes nothing.
    """
    fingerprint = imported_fingerprint(aligned=aligned, layout=layout, label=label)
    folder = Path(folder)
    if not folder.is_dir():
        raise StoreError(f"Guidance folder {folder} does not exist.")
    sp = store[split]
    found, missing, unused = match_files(folder, sp.ids)
    if not found:
        flat = sp.ids[0].replace("/", FLAT_SEPARATOR)
        example = f"{sp.ids[0]}.png" + (f" or {flat}.png" if flat != sp.ids[0] else "")
        raise StoreError(f"No guidance image in {folder} is named after an image id of split '{split}' "
                         f"(expected e.g. {example}).")
    for _ in bounded_map(read_image, list(found.values()), workers=2):
        pass  # raises ImageReadError naming the first unreadable file
    gs = store.guidance_for(fingerprint, provenance="aligned" if aligned else "unknown", force=force)
    items = sorted(found.items())
    for n, (i, img) in enumerate(zip([i for i, _ in items], bounded_map(read_image, [p for _, p in items], 2)), 1):
        gs.write(split, i, _to_guidance(img, gs.size))
        if progress:
            progress(n, len(items))
    return TransferSummary(written=len(items), missing=missing, group=gs.id, unused=unused)


def export_guidance(store: Store, folder: str | Path, *, splits: list[str] | None = None, gid: str | None = None,
                    progress: Callable[[int, int], None] | None = None) -> TransferSummary:
    """Write guidance as ``folder/<split>/<id>.png``; images without guidance are listed as missing.

    A group made by the ``caption`` source also gets ``folder/<split>/captions.jsonl`` (one
    ``{"split", "id", "raw", "prompt", "edited"}`` per line; ``tdr cache captions --from`` reads it back)."""
    folder = Path(folder)
    blocking = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise StoreError(f"Cannot export into {folder}: {blocking} is a file, not a folder; choose another folder.")
    gs = store.guidance(gid)
    names = splits or [s for s in store.splits if s in gs.group]
    written, missing = 0, []
    todo = []
    for name in names:
        done = gs.done(name, check=False)
        ids = store[name].ids
        todo += [(name, i, ids[i]) for i in range(len(ids)) if done[i]]
        missing += [f"{name}/{ids[i]}" for i in range(len(ids)) if not done[i]]
    for name, i, image_id in todo:
        path = folder / name / f"{image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(path, gs.read(name, i))  # a corrupt chunk: one line naming the image
        written += 1
        if progress:
            progress(written, len(todo))
    if captions.has_captions(gs):  # the text each exported image was made from, beside the PNGs
        for name in names:
            rows = captions.records(gs, [name])
            if rows:
                (folder / name).mkdir(parents=True, exist_ok=True)
                captions.write_jsonl(rows, folder / name / "captions.jsonl")
    return TransferSummary(written=written, missing=missing, group=gs.id)
