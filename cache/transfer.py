"""Guidance in and out of a store as ordinary image files named by image id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from . import captions
from .errors import StoreError
from .images import read_image, write_png
from .ingest import bounded_map
from .store import LAYOUTS, Store

IMPORTED_FINGERPRINT = {"kind": "imported"}  # plus provenance/layout/label where not the defaults
_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class TransferSummary:
    written: int
    missing: list[str]
    group: str


def _candidates(folder: Path, image_id: str) -> list[Path]:
    stems = dict.fromkeys([image_id, image_id.replace("/", "_"), image_id.replace("/", "-"), image_id.split("/")[-1]])
    return [folder / f"{stem}{ext}" for stem in stems for ext in _EXTS + tuple(e.upper() for e in _EXTS)]


def _to_guidance(img: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8/uint16 → (size, size, 3) uint8, bicubic."""
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) / 257.0).round().astype(np.uint8)
    if img.shape[:2] != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))
    return np.ascontiguousarray(img[..., :3])


def imported_fingerprint(*, aligned: bool = False, layout: str = "center", label: str | None = None) -> dict:
    """Fingerprint of an imported guidance group. Imports declared differently (aligned or not, the
    layout, a label naming the source) are different groups; the defaults give the fingerprint that
    imports had before these settings existed, so such groups are continued, not duplicated."""
    if layout not in LAYOUTS:
        raise StoreError(f"layout must be one of {', '.join(LAYOUTS)}, not '{layout}'.")
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
    found: dict[int, Path] = {}
    missing = []
    for i, image_id in enumerate(sp.ids):
        path = next((c for c in _candidates(folder, image_id) if c.is_file()), None)
        if path is None:
            missing.append(image_id)
        else:
            found[i] = path
    if not found:
        raise StoreError(f"No guidance image in {folder} is named after an image id of split '{split}' "
                         f"(expected e.g. {sp.ids[0]}.png).")
    for _ in bounded_map(read_image, list(found.values()), workers=2):
        pass  # raises ImageReadError naming the first unreadable file
    gs = store.guidance_for(fingerprint, provenance="aligned" if aligned else "unknown", force=force)
    items = sorted(found.items())
    for n, (i, img) in enumerate(zip([i for i, _ in items], bounded_map(read_image, [p for _, p in items], 2)), 1):
        gs.write(split, i, _to_guidance(img, gs.size))
        if progress:
            progress(n, len(items))
    return TransferSummary(written=len(items), missing=missing, group=gs.id)


def export_guidance(store: Store, folder: str | Path, *, splits: list[str] | None = None, gid: str | None = None,
                    progress: Callable[[int, int], None] | None = None) -> TransferSummary:
    """Write guidance as ``folder/<split>/<id>.png``; images without guidance are listed as missing.

    A group made by the ``caption`` source also gets ``folder/<split>/captions.jsonl`` (one
    ``{"split", "id", "raw", "prompt", "edited"}`` per line; ``tdr cache captions --from`` reads it back)."""
    gs = store.guidance(gid)
    folder = Path(folder)
    names = splits or [s for s in store.splits if s in gs.group]
    written, missing = 0, []
    todo = []
    for name in names:
        done = gs.done(name, check=False)
        ids = store[name].ids
        todo += [(name, i, ids[i]) for i in range(len(ids)) if done[i]]
        missing += [f"{name}/{ids[i]}" for i in range(len(ids)) if not done[i]]
    arrays = {name: gs.array(name) for name in names}
    for name, i, image_id in todo:
        path = folder / name / f"{image_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(path, arrays[name][i])
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
