"""What a store holds (:func:`info`) and whether every chunk of it is intact (:func:`verify`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import captions
from ..errors import DataIntegrityError
from .store import Store, pixel_sha256


UNFINISHED = ("ingest never finished (killed, or still running elsewhere): readers do not see it; "
              "run 'tdr cache ingest' for it again")


@dataclass
class Problem:
    split: str
    part: str        # "lq" | "gt" | "guidance/<gid>"
    image_id: str
    what: str        # "corrupt chunk: …" | "missing tiles" | "missing"

    def __str__(self) -> str:
        if self.part == "split":
            return f"split '{self.split}': {self.what}"
        return f"{self.split}/{self.part} '{self.image_id}': {self.what}"


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def info(store: Store) -> dict:
    """Per split: image counts, clean images, guidance done/missing per group, bytes on disk."""
    out = {"url": store.url, "dataset": store.dataset, "metric": store.metric, "splits": {}, "guidance": {},
           "default_guidance": store.group.attrs.get("guidance_default")}
    out["unfinished_splits"] = store.unfinished_splits
    for name in store.splits:
        sp = store[name]
        out["splits"][name] = {"images": len(sp), "clean_images": len(sp.gt_keys), "dtype": str(sp.dtype),
                               "bytes": store.nbytes(name)}
    for gid in store.guidance_ids():
        gs = store.guidance(gid)
        per_split = {}
        for name in store.splits:
            done = gs.done(name, check=False)
            per_split[name] = {"done": int(done.sum()), "missing": int(len(done) - done.sum())}
        out["guidance"][gid] = {"fingerprint": gs.fingerprint, "size": gs.size, "provenance": gs.provenance,
                                "layout": gs.layout, "splits": per_split,
                                "bytes": store.nbytes(f"guidance/{gid}")}
        if captions.has_captions(gs):
            recs = captions.records(gs)
            out["guidance"][gid]["captions"] = {"count": len(recs), "edited": sum(bool(r["edited"]) for r in recs),
                                                "sample": recs[:3]}
    out["bytes"] = store.nbytes()
    return out


def verify(store: Store, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Read every chunk (checksums) and re-hash every stored image; list what is corrupt or missing.

    Degraded/clean images must match the sha256 recorded at ingest (a lost tile reads back as zeros and
    fails it). Guidance chunks must decode; within a split that has a guidance array, images without
    guidance are listed as missing.
    """
    report = VerifyReport()
    for name in store.unfinished_splits:
        report.problems.append(Problem(name, "split", "*", UNFINISHED))
    splits = {name: store[name] for name in store.splits}
    groups = [store.guidance(g) for g in store.guidance_ids()]
    total = sum(len(sp) + len(sp.gt_keys) for sp in splits.values())
    total += sum(len(sp) for gs in groups for name, sp in splits.items() if name in gs.group)
    step = 0

    def tick():
        nonlocal step
        step += 1
        report.checked += 1
        if progress:
            progress(step, total)

    for name, sp in splits.items():
        lq_sha = sp.lq_sha()
        for i, image_id in enumerate(sp.ids):
            _check_image(report, name, "lq", image_id, lambda: sp.read_lq(i), lq_sha[i])
            tick()
        gt_sha = sp.group["gt_sha"][...] if "gt_sha" in sp.group else np.zeros((0, 32), np.uint8)
        first_user = {int(j): i for i, j in reversed(list(enumerate(sp.gt_index))) if j >= 0}
        for j, key in enumerate(sp.gt_keys):
            i = first_user.get(j)
            label = sp.ids[i] if i is not None else key
            _check_image(report, name, "gt", label, (lambda i=i: sp.read_gt(i)), gt_sha[j])
            tick()
    for gs in groups:
        for name, sp in splits.items():
            if name not in gs.group:
                continue
            present = gs._chunk_keys(name)
            arr = gs.group[name]
            for i, image_id in enumerate(sp.ids):
                if i not in present:
                    report.problems.append(Problem(name, f"guidance/{gs.id}", image_id, "missing"))
                else:
                    try:
                        arr[i]
                    except Exception as exc:
                        report.problems.append(Problem(name, f"guidance/{gs.id}", image_id,
                                                       f"corrupt chunk ({_short(exc)})"))
                tick()
            if captions.has_captions(gs):  # every image with guidance has the caption it was made from
                for i in sorted(present):
                    try:
                        ok = i >= len(sp.ids) or captions.read(gs, name, i) is not None
                    except Exception as exc:
                        report.problems.append(Problem(name, f"captions/{gs.id}", sp.ids[i],
                                                       f"corrupt chunk ({_short(exc)})"))
                        continue
                    if not ok:
                        report.problems.append(Problem(name, f"captions/{gs.id}", sp.ids[i], "missing"))
    return report


def _check_image(report: VerifyReport, split: str, part: str, image_id: str, read, sha) -> None:
    try:
        img = read()
    except DataIntegrityError as exc:
        report.problems.append(Problem(split, part, image_id, exc.what))
        return
    except Exception as exc:
        report.problems.append(Problem(split, part, image_id, f"corrupt chunk ({_short(exc)})"))
        return
    if pixel_sha256(img) != bytes(np.asarray(sha, np.uint8)):
        report.problems.append(Problem(split, part, image_id, "content differs from ingest (missing or altered tiles)"))


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:120]
