"""Motion and defocus deblurring: GoPro, HIDE, RealBlur-J/-R, DPDD (layouts and sizes as
each dataset is published)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import Dataset, Scan, by_stem, first_dir, folder_pairs, list_images, match, metric, natural_key
from .refs import file_ref


@dataclass(frozen=True, kw_only=True)
class GoPro(Dataset):
    """GoPro (Nah et al. 2017): original ``GOPRO_Large`` scene folders, or the re-packed input/target."""

    def _scan(self, root: Path, split: str) -> Scan:
        base = root / split
        if not base.is_dir():
            raise self._missing(base, "split folder", whole_split=True)
        scan = Scan()
        if (base / "input").is_dir() and (base / "target").is_dir():
            folder_pairs(self, base / "input", base / "target", root, scan)
            return scan
        scenes = [d for d in base.iterdir() if (d / "blur").is_dir() or (d / "sharp").is_dir()]
        scenes.sort(key=lambda d: natural_key(d.name))
        if not scenes:
            raise self._layout_error(base, "input/ and target/ folders, nor GOPRxxxx_xx_xx/{blur,sharp}/ scene folders")
        for scene in scenes:
            blur, sharp = scene / "blur", scene / "sharp"  # blur_gamma/ is ignored
            if not blur.is_dir() or not sharp.is_dir():
                absent = blur if not blur.is_dir() else sharp
                scan.problems.append(f"Scene folder '{scene}' has no '{absent.name}/' folder; re-download that scene.")
                continue
            lq = by_stem(list_images(blur), blur, scan.problems)
            gt = by_stem(list_images(sharp), sharp, scan.problems)
            for key, lq_path, gt_path in match(lq, gt, blur, sharp, scan):
                scan.pairs.append(self._pair(f"{scene.name}/{key}", file_ref(lq_path, root), file_ref(gt_path, root)))
        return scan


@dataclass(frozen=True, kw_only=True)
class Hide(Dataset):
    """HIDE (Shen et al. 2019) test set: close-ups and long shots against ``GT/`` (which also holds train GT)."""

    subsets: tuple[str, ...] = ("test-close-ups", "test-long-shot")

    def _scan(self, root: Path, split: str) -> Scan:
        scan = Scan()
        for base in (root / split / "HIDE", root / "HIDE", root):
            if (base / "input").is_dir() and (base / "target").is_dir():
                folder_pairs(self, base / "input", base / "target", root, scan)
                return scan
        test_dir, gt_dir = root / split, root / "GT"
        if not test_dir.is_dir():
            raise self._missing(test_dir, "folder", whole_split=True)
        if not gt_dir.is_dir():
            raise self._missing(gt_dir, "folder")
        gt = by_stem(list_images(gt_dir), gt_dir, scan.problems)
        present = [test_dir / name for name in self.subsets if (test_dir / name).is_dir()]
        if not present:
            raise self._layout_error(test_dir, "test-close-ups/ and test-long-shot/ folders")
        for subset in present:
            lq = by_stem(list_images(subset), subset, scan.problems)
            for key, lq_path, gt_path in match(lq, gt, subset, gt_dir, scan, unused_gt="ignore"):
                scan.pairs.append(self._pair(f"{subset.name}/{key}", file_ref(lq_path, root), file_ref(gt_path, root)))
        return scan


@dataclass(frozen=True, kw_only=True)
class RealBlur(Dataset):
    """RealBlur (Rim et al. 2020): pairs listed in ``RealBlur_<J|R>_<split>_list.txt`` as ``<gt> <blur>``."""

    variant: str = "J"

    def _scan(self, root: Path, split: str) -> Scan:
        scan = Scan()
        list_file = root / f"RealBlur_{self.variant}_{split}_list.txt"
        if not list_file.is_file():
            repacked = first_dir(root / split, (f"RealBlur_{self.variant}", f"RealBlur-{self.variant}")) or root / split
            if (repacked / "input").is_dir() and (repacked / "target").is_dir():
                folder_pairs(self, repacked / "input", repacked / "target", root, scan)
                return scan
            raise self._missing(list_file, "list file", whole_split=True)
        seen: set[str] = set()
        for number, line in enumerate(list_file.read_text().splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                scan.problems.append(
                    f"Line {number} of '{list_file}' is not '<gt path> <blur path>'; fix or delete it."
                )
                continue
            gt_path, lq_path = root / fields[0], root / fields[1]
            absent = [p for p in (lq_path, gt_path) if not p.is_file()]
            if absent:
                scan.problems.append(
                    f"'{absent[0]}' (line {number} of '{list_file.name}') does not exist; re-download it."
                )
                continue
            parts = Path(fields[1]).with_suffix("").parts  # id: the blur path without its top folder
            pair_id = "/".join(parts[1:]) or parts[-1]
            if pair_id in seen:
                scan.problems.append(f"'{lq_path}' is listed twice in '{list_file}'; remove the duplicate line.")
                continue
            seen.add(pair_id)
            scan.pairs.append(self._pair(pair_id, file_ref(lq_path, root), file_ref(gt_path, root)))
        return scan


@dataclass(frozen=True, kw_only=True)
class Dpdd(Dataset):
    """DPDD (Abuolaim & Brown 2020), combined view: ``<split>_c/{source,target}`` 16-bit PNGs paired by
    natural sort order (the file names differ); the dual-pixel ``_l``/``_r`` views are ignored."""

    def _scan(self, root: Path, split: str) -> Scan:
        base = root / f"{split}_c"
        if not base.is_dir():
            raise self._missing(base, "folder", whole_split=True)
        source, target = base / "source", base / "target"
        for folder in (source, target):
            if not folder.is_dir():
                raise self._missing(folder, "folder")
        lq, gt = list_images(source), list_images(target)
        scan = Scan()
        if len(lq) != len(gt):
            longer, folder = (lq, target) if len(lq) > len(gt) else (gt, source)
            extra = longer[min(len(lq), len(gt))]
            scan.problems.append(
                f"'{source}' has {len(lq)} images but '{target}' has {len(gt)}, so '{extra}' has no partner "
                f"in '{folder}'; restore the missing files."
            )
            return scan
        for lq_path, gt_path in zip(lq, gt):
            scan.pairs.append(self._pair(lq_path.stem, file_ref(lq_path, root), file_ref(gt_path, root)))
        return scan


_REALBLUR_LAYOUT = """\
ROOT/RealBlur_{v}_train_list.txt, RealBlur_{v}_test_list.txt   lines: '<gt path> <blur path>' relative to ROOT
ROOT/RealBlur-{v}_ECC_IMCORR_centroid_itensity_ref/sceneNNN/blur/blur_K.png
ROOT/RealBlur-{v}_ECC_IMCORR_centroid_itensity_ref/sceneNNN/gt/gt_K.png
or re-packed: ROOT/test/RealBlur_{v}/{{input,target}}/NAME.png"""

GOPRO = GoPro(
    name="gopro",
    title="GoPro",
    degradation="blur",
    splits=("train", "test"),
    metric=metric(ssim="matlab3d"),
    expected_counts={"train": 2103, "test": 1111},
    layout="""\
original GOPRO_Large: ROOT/{train,test}/GOPRxxxx_xx_xx/{blur,blur_gamma,sharp}/000047.png  (blur/ is used)
or re-packed (Restormer/NAFNet): ROOT/{train,test}/{input,target}/GOPR0384_11_00-000001.png
1280x720; 2,103 train / 1,111 test pairs""",
)

HIDE = Hide(
    name="hide",
    title="HIDE",
    degradation="blur",
    splits=("test",),
    metric=metric(ssim="matlab3d"),
    expected_counts={"test": 2025},
    layout="""\
original: ROOT/test/test-close-ups/*.png, ROOT/test/test-long-shot/*.png, clean: ROOT/GT/*.png (same name)
or re-packed (Restormer): ROOT/test/HIDE/{input,target}/NAME.png
2,025 test pairs""",
)

REALBLUR_J = RealBlur(
    name="realblur-j",
    title="RealBlur-J",
    variant="J",
    degradation="blur",
    splits=("train", "test"),
    metric=metric(align=True),
    expected_counts={"train": 3758, "test": 980},
    layout=_REALBLUR_LAYOUT.format(v="J") + "\n3,758 train / 980 test pairs",
)

REALBLUR_R = RealBlur(
    name="realblur-r",
    title="RealBlur-R",
    variant="R",
    degradation="blur",
    splits=("train", "test"),
    metric=metric(align=True),
    expected_counts={"train": 3758, "test": 980},
    layout=_REALBLUR_LAYOUT.format(v="R") + "\n3,758 train / 980 test pairs",
)

DPDD = Dpdd(
    name="dpdd",
    title="DPDD",
    degradation="defocus",
    splits=("train", "val", "test"),
    expected_counts={"train": 350, "val": 74, "test": 76},
    layout="""\
ROOT/{train,val,test}_c/source/*.png (defocused), ROOT/{train,val,test}_c/target/*.png (all-in-focus)
16-bit PNG; names differ: paired by sorted order; the _l/_r dual-pixel views are ignored
350 train / 74 val / 76 test pairs""",
)
