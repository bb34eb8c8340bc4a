"""Guidance is addressed by content: the sha256 of the degraded pixels (``<split>/lq_sha``).

Within one guidance group (one fingerprint), equal degraded pixels get equal guidance — generation
draws each image's noise from (seed, content hash), not from its id — so guidance found for the same
pixels anywhere (another split, another store of another dataset) is copied instead of sampled again.

:func:`content_index` maps content → where its guidance already is; :func:`merge` copies guidance from one
store into another with an equal fingerprint for every image of the target whose pixels it knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import FingerprintMismatch, StoreError
from .fingerprint import describe_difference
from .store import GuidanceSet, Store

Row = tuple[str, int]  # (split, row)


def content_index(gs: GuidanceSet, done: Mapping[str, np.ndarray] | None = None) -> dict[bytes, Row]:
    """{lq sha256 → (split, row)} for every image of the store whose guidance exists in ``gs``.

    ``done``: per split, already computed (N,) bool done-masks to reuse; other splits are listed
    (chunk present, checksum not read: a corrupt source is caught when it is copied).
    """
    index: dict[bytes, Row] = {}
    done = dict(done or {})
    for split in gs.store.splits:
        if split not in gs.group:
            continue
        mask = done[split] if split in done else gs.done(split, check=False)
        if not mask.any():
            continue
        shas = gs.store[split].lq_sha()
        for i in np.flatnonzero(mask):
            index.setdefault(bytes(shas[i]), (split, int(i)))
    return index


def copy_guidance(src: GuidanceSet, src_row: Row, dst: GuidanceSet, dst_row: Row) -> bool:
    """Copy one image's guidance (its caption first, if it has one); False (nothing written) if the source
    chunk is unreadable."""
    from . import captions

    try:
        image = src.array(src_row[0])[src_row[1]]
    except Exception:
        return False
    captions.copy(src, src_row, dst, dst_row)
    dst.write(dst_row[0], dst_row[1], image)
    return True


@dataclass
class MergeSummary:
    groups: list[str]
    copied: int = 0
    already: int = 0        # target images that had guidance before
    missing: int = 0        # target images still without guidance (content unknown to the source)
    unreadable: int = 0     # source chunks that failed their checksum (not copied)


def merge(src: Store, dst: Store, *, progress: Callable[[int, int], None] | None = None) -> MergeSummary:
    """Copy every guidance group of ``src`` into ``dst``, matched by content across all splits.

    A group is merged into the ``dst`` group with the same fingerprint, or created in ``dst`` when it holds
    no guidance yet; if ``dst`` holds guidance made with other settings, nothing is written and
    :class:`FingerprintMismatch` says what differs. ``dst``'s own images decide what is copied: source
    images whose pixels appear nowhere in ``dst`` are not added.
    """
    src_groups = [src.guidance(g) for g in src.guidance_ids()]
    if not src_groups:
        raise StoreError(f"Store {src.url} holds no guidance to merge.")
    dst_ids = dst.guidance_ids()
    for g in src_groups:
        if dst_ids and g.id not in dst_ids:
            other = dst.guidance()
            raise FingerprintMismatch(
                f"Store {dst.url} holds guidance made with other settings than {src.url} "
                f"({describe_difference(other.fingerprint, g.fingerprint)}); only stores with equal "
                "fingerprints can be merged.")
    summary = MergeSummary(groups=[g.id for g in src_groups])
    for g in src_groups:
        target = dst.guidance_for({k: v for k, v in g.fingerprint.items() if k != "size"}, size=g.size,
                                  provenance=g.provenance)
        if target.id != g.id:  # cannot happen for groups made by tdr; guards hand-made fingerprints
            raise FingerprintMismatch(f"Guidance group {g.id} of {src.url} has an inconsistent fingerprint.")
        index = content_index(g)
        work: list[tuple[Row, Row]] = []
        for split in dst.splits:
            done = target.done(split) if split in target.group else np.zeros(len(dst[split]), bool)
            summary.already += int(done.sum())
            shas = dst[split].lq_sha()
            for i in np.flatnonzero(~done):
                source = index.get(bytes(shas[i]))
                if source is None:
                    summary.missing += 1
                else:
                    work.append((source, (split, int(i))))
        for n, (source, row) in enumerate(work, 1):
            if copy_guidance(g, source, target, row):
                summary.copied += 1
            else:
                summary.unreadable += 1
                summary.missing += 1
            if progress:
                progress(n, len(work))
    return summary


def rows_by_content(store: Store, rows: Sequence[Row]) -> dict[bytes, list[Row]]:
    """Group (split, row) pairs by the sha256 of their degraded pixels, in first-seen order."""
    shas = {s: store[s].lq_sha() for s in {s for s, _ in rows}}
    groups: dict[bytes, list[Row]] = {}
    for s, i in rows:
        groups.setdefault(bytes(shas[s][i]), []).append((s, i))
    return groups
