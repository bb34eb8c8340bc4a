"""``folder``: the user's own data as ``ROOT/{train,test}/{lq,gt}/`` with files paired by relative path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import Dataset, Scan, by_stem, folder_pairs, list_images
from .refs import file_ref


@dataclass(frozen=True, kw_only=True)
class Folder(Dataset):
    """Pairs ``<split>/lq/a/b.jpg`` with ``<split>/gt/a/b.png`` (extension aside); id = ``a/b``. A split
    may be absent, and a split without ``gt/`` gives pairs without a clean image (inference only)."""

    def _scan(self, root: Path, split: str) -> Scan:
        base = root / split
        if not base.is_dir():
            raise self._missing(base, "split folder", whole_split=True)
        lq_dir, gt_dir = base / "lq", base / "gt"
        if not lq_dir.is_dir():
            raise self._missing(lq_dir, "folder")
        scan = Scan()
        if gt_dir.is_dir():
            folder_pairs(self, lq_dir, gt_dir, root, scan, recursive=True)
            return scan
        scan.notes.append(f"'{base}' has no gt/ folder: its {split} images have no clean image.")
        for key, path in by_stem(list_images(lq_dir, recursive=True), lq_dir, scan.problems).items():
            scan.pairs.append(self._pair(key, file_ref(path, root), None))
        return scan


FOLDER = Folder(
    name="folder",
    title="a custom paired folder",
    degradation="mixed",
    splits=("train", "test"),
    layout="""\
ROOT/{train,test}/lq/NAME.png  (degraded)   ROOT/{train,test}/gt/NAME.png  (clean)
paired by relative path without extension (sub-folders allowed: id = sub/NAME); either split may be absent;
without gt/ the pairs have no clean image (guidance generation only)""",
)
