"""The dataset contract: ``Dataset.pairs(root, split)`` lists pairs or raises one clear ``DatasetError``;
``Dataset.check(root)`` lists every problem without raising. Families subclass ``Dataset`` and implement
``_scan(root, split) -> Scan``; helpers here list and match files deterministically.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import DatasetError
from ..images import IMAGE_SUFFIXES
from .refs import ImageRef, Pair, file_ref


def metric(y_channel: bool = False, ssim: str = "basicsr", crop_border: int = 0, align: bool = False) -> dict:
    """How a dataset is scored, as its papers do: Y channel for deraining, RGB otherwise; ``ssim`` is
    ``"basicsr"`` (per-channel 11×11 Gaussian) or ``"matlab3d"`` (MATLAB's 3-D SSIM, GoPro/HIDE papers);
    ``align``: the output is ECC-aligned to the ground truth first (RealBlur)."""
    return {"y_channel": y_channel, "crop_border": crop_border, "ssim": ssim, "align": align}


@dataclass(frozen=True)
class CheckReport:
    """What ``Dataset.check`` found: pairs per split (0 if the split could not be listed), every problem
    (each one sentence naming a file or folder) and notes (counts that differ from the published size,
    absent optional splits, unused files)."""

    dataset: str
    root: str | None
    counts: dict[str, int]
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    expected: dict[str, int] = field(default_factory=dict)  # published pairs per split, where known

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class Scan:
    """One split as listed: the pairs that matched, and problems/notes found on the way."""

    pairs: list[Pair] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class MissingSplit(DatasetError):
    """A whole split is absent (in ``check`` only a note when another split is present)."""


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """A named dataset: how it lies on disk and how its files pair up."""

    name: str
    title: str
    layout: str  # multi-line text for `tdr datasets`
    splits: tuple[str, ...]
    degradation: str  # "blur", "defocus", "haze", "rain", "noise", "mixed"
    metric: Mapping = field(default_factory=metric)
    expected_counts: Mapping[str, int] = field(default_factory=dict)  # published pairs per split
    needs_root: bool = True

    # -- public API

    def pairs(self, root: str | Path | None, split: str) -> list[Pair]:
        """The pairs of ``split`` in a deterministic order; ``DatasetError`` on a layout or pairing fault."""
        root_path = self._root(root)
        self._check_split(split)
        scan = self._scan(root_path, split)
        if scan.problems:
            more = len(scan.problems) - 1
            listing = f"`tdr datasets check {self.name} --root {root}` lists them all"
            suffix = f" (and {more} more: {listing})" if more else ""
            raise DatasetError(scan.problems[0].rstrip(".") + suffix + ".")
        return scan.pairs

    def check(self, root: str | Path | None) -> CheckReport:
        """Counts per split and every problem found, without raising for layout or pairing faults."""
        counts: dict[str, int] = {}
        problems: list[str] = []
        notes: list[str] = []
        missing: list[str] = []
        try:
            root_path = self._root(root)
        except DatasetError as exc:
            return CheckReport(
                self.name, None if root is None else str(root), {s: 0 for s in self.splits}, (str(exc),),
                expected=dict(self.expected_counts),
            )
        for split in self.splits:
            try:
                scan = self._scan(root_path, split)
            except MissingSplit as exc:
                counts[split] = 0
                missing.append(str(exc))
                continue
            except DatasetError as exc:
                counts[split] = 0
                problems.append(str(exc))
                continue
            counts[split] = len(scan.pairs)
            problems.extend(scan.problems)
            notes.extend(scan.notes)
            expected = self.expected_counts.get(split)
            if expected is not None and not scan.problems and len(scan.pairs) != expected:
                notes.append(f"{split}: {len(scan.pairs)} pairs found where {self.title} has {expected:,}.")
        if len(missing) == len(self.splits):
            problems[:0] = missing
        else:
            notes[:0] = missing
        return CheckReport(
            self.name, None if root is None else str(root), counts, tuple(problems), tuple(notes),
            expected=dict(self.expected_counts),
        )

    def available_splits(self, root: str | Path | None) -> list[str]:
        """The splits present under ``root`` (a split whose folder or list file is absent is left out;
        one present but faulty is kept, so that listing it reports the fault)."""
        root_path = self._root(root)
        found = []
        for split in self.splits:
            try:
                self._scan(root_path, split)
            except MissingSplit:
                continue
            except DatasetError:
                pass
            found.append(split)
        return found

    def options(self) -> dict:
        """Options that change the pairs (e.g. noise σ); recorded beside whatever is made from them."""
        return {}

    def with_options(self, **options) -> Dataset:
        """This dataset with other options; datasets without options refuse any."""
        if options:
            raise DatasetError(f"Dataset '{self.name}' takes no options, got {', '.join(sorted(options))}.")
        return self

    # -- for subclasses

    def _scan(self, root: Path, split: str) -> Scan:
        raise NotImplementedError

    def _pair(self, pair_id: str, lq: ImageRef, gt: ImageRef | None) -> Pair:
        return Pair(pair_id, lq, gt, gt.key if gt is not None else "", self.degradation)

    def _root(self, root: str | Path | None) -> Path:
        if root is None:
            if self.needs_root:
                raise DatasetError(f"Dataset '{self.name}' needs root: the folder that holds {self.title}.",
                                   param="root")
            return Path(".")
        path = Path(root).expanduser().absolute()
        if not path.is_dir():
            raise DatasetError(f"Dataset folder '{path}' does not exist; pass the folder that holds {self.title}.",
                               param="root")
        return path

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            choices = ", ".join(self.splits)
            raise DatasetError(f"Dataset '{self.name}' has no split '{split}'; choose one of: {choices}.")

    def _layout_error(self, path: Path, expected: str) -> DatasetError:
        """The error for a folder that exists but matches none of the accepted layouts."""
        return DatasetError(
            f"{self.title}: '{path}' does not hold {expected}; "
            f"arrange the download as `tdr datasets` shows for '{self.name}' and pass its top folder as root.",
            param="root")

    def _missing(self, path: Path, what: str, whole_split: bool = False) -> DatasetError:
        """The error for an expected folder/file that is absent."""
        cls = MissingSplit if whole_split else DatasetError
        return cls(
            f"{self.title}: expected {what} '{path}' was not found; "
            f"arrange the download as `tdr datasets` shows for '{self.name}' and pass its top folder as root.",
            param="root")


# -------------------------------------------------------------------------------------- file helpers

_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple:
    """Sort key that orders 'img2' before 'img10' (as natsort does); ties fall back to the plain string."""
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in _DIGITS.split(text) if p)
    return parts, text


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (and below, if ``recursive``), naturally sorted by relative path."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    files = [p for p in found if is_image(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(files, key=lambda p: natural_key(p.relative_to(folder).as_posix()))


def first_dir(base: Path, names: Iterable[str]) -> Path | None:
    """The first of ``base/name`` that is a folder, or None."""
    for name in names:
        if (base / name).is_dir():
            return base / name
    return None


def by_stem(files: list[Path], folder: Path, problems: list[str], name=None) -> dict[str, Path]:
    """{relative path without extension (or ``name(path)``): path}; two files with one name are a problem."""
    table: dict[str, Path] = {}
    for path in files:
        key = name(path) if name else path.relative_to(folder).with_suffix("").as_posix()
        if key in table:
            problems.append(f"'{table[key]}' and '{path}' have the same name; keep only one of them.")
            continue
        table[key] = path
    return table


def match(
    lq: Mapping[str, Path], gt: Mapping[str, Path], lq_dir: Path, gt_dir: Path, scan: Scan, unused_gt: str = "problem"
) -> list[tuple[str, Path, Path]]:
    """(name, lq path, gt path) for names in both tables, in ``lq``'s order. A degraded file without its clean
    one is a problem; a clean file without a degraded one is a problem, one summary note or ignored
    (``unused_gt``: "problem" | "note" | "ignore")."""
    matched = []
    for key, path in lq.items():
        if key in gt:
            matched.append((key, path, gt[key]))
        else:
            scan.problems.append(
                f"'{path}' has no matching clean image in '{gt_dir}'; add its clean image or remove this file."
            )
    used = {g for _, _, g in matched}
    unused = [path for path in gt.values() if path not in used]
    if unused and unused_gt == "problem":
        scan.problems.extend(
            f"'{path}' has no matching degraded image in '{lq_dir}'; add its degraded image or remove this file."
            for path in unused
        )
    elif unused and unused_gt == "note":
        scan.notes.append(f"{len(unused)} clean image(s) in '{gt_dir}' are not used, e.g. '{unused[0].name}'.")
    return matched


def folder_pairs(
    dataset: Dataset, lq_dir: Path, gt_dir: Path, root: Path, scan: Scan, recursive: bool = False, prefix: str = ""
) -> None:
    """Append to ``scan`` the pairs of two parallel folders matched by file name (extension aside)."""
    lq = by_stem(list_images(lq_dir, recursive), lq_dir, scan.problems)
    gt = by_stem(list_images(gt_dir, recursive), gt_dir, scan.problems)
    for key, lq_path, gt_path in match(lq, gt, lq_dir, gt_dir, scan):
        scan.pairs.append(dataset._pair(prefix + key, file_ref(lq_path, root), file_ref(gt_path, root)))
