"""Deraining: Rain100L / RainTrainL, Rain200L/H, DID-Data (Rain1200), DDN-Data (Rain14000).

All are scored on the Y channel, as the deraining papers do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .base import Dataset, Scan, by_stem, first_dir, folder_pairs, list_images, match, metric
from .refs import Crop, file_ref

_Y = metric(y_channel=True)
_SPLIT_NAMES = {"train": ("train", "training"), "test": ("test", "testing")}


def _has_pair_folders(base: Path) -> bool:
    return (base / "input").is_dir() and (base / "target").is_dir()


@dataclass(frozen=True, kw_only=True)
class RainPrefix(Dataset):
    """Rain100L / RainTrainL (Yang et al. 2017): ``rain-001.png`` ↔ ``norain-001.png`` in one folder (or in
    ``rain/`` and ``norain/``); other JORDER files (``rainregion-``, ``rainstreak-``) are ignored."""

    def _scan(self, root: Path, split: str) -> Scan:
        scan = Scan()
        for base in (root / split, root):
            if _has_pair_folders(base):
                folder_pairs(self, base / "input", base / "target", root, scan)
                return scan
            rain_dir = base / "rain" if (base / "rain").is_dir() else base
            norain_dir = base / "norain" if (base / "norain").is_dir() else base
            if not rain_dir.is_dir():
                continue
            rain = _prefixed(rain_dir, "rain-", scan)
            norain = _prefixed(norain_dir, "norain-", scan)
            if rain or norain:
                for key, lq_path, gt_path in match(rain, norain, rain_dir, norain_dir, scan):
                    scan.pairs.append(self._pair(key, file_ref(lq_path, root), file_ref(gt_path, root)))
                return scan
        raise self._layout_error(root, "rain-NNN.png / norain-NNN.png files nor input/ and target/ folders")


def _prefixed(folder: Path, prefix: str, scan: Scan) -> dict[str, Path]:
    files = [p for p in list_images(folder) if p.stem.startswith(prefix)]
    return by_stem(files, folder, scan.problems, name=lambda p: p.stem[len(prefix) :])


@dataclass(frozen=True, kw_only=True)
class Rain200(Dataset):
    """Rain200L/H (Yang et al. 2017): ``<split>/rain/X2/norain-Nx2.png`` → ``<split>/norain/norain-N.png``,
    or re-packed ``<split>/{input,target}/N.png``."""

    def _scan(self, root: Path, split: str) -> Scan:
        base = root / split
        if not base.is_dir():
            raise self._missing(base, "split folder", whole_split=True)
        scan = Scan()
        if _has_pair_folders(base):
            folder_pairs(self, base / "input", base / "target", root, scan)
            return scan
        rain_dir, norain_dir = base / "rain", base / "norain"
        if not rain_dir.is_dir() or not norain_dir.is_dir():
            raise self._layout_error(base, "rain/X2/ and norain/ folders nor input/ and target/ folders")
        if (rain_dir / "X2").is_dir():
            rain_dir = rain_dir / "X2"
        lq = by_stem(list_images(rain_dir), rain_dir, scan.problems, name=lambda p: re.sub(r"x2$", "", p.stem))
        gt = by_stem(list_images(norain_dir), norain_dir, scan.problems)
        for key, lq_path, gt_path in match(lq, gt, rain_dir, norain_dir, scan):
            scan.pairs.append(self._pair(key, file_ref(lq_path, root), file_ref(gt_path, root)))
        return scan


@dataclass(frozen=True, kw_only=True)
class SideBySide(Dataset):
    """DID-Data / Rain1200 (Zhang & Patel 2018): each image holds the pair side by side, rainy left half and
    clean right half; split by a crop at load time. Re-packed ``<split>/{input,target}`` is also accepted."""

    def _scan(self, root: Path, split: str) -> Scan:
        base = first_dir(root, _SPLIT_NAMES[split])
        if base is None:
            raise self._missing(root / split, "split folder", whole_split=True)
        scan = Scan()
        if _has_pair_folders(base):
            folder_pairs(self, base / "input", base / "target", root, scan)
            return scan
        files = list_images(base, recursive=True)
        if not files:
            raise self._layout_error(base, "side-by-side rainy|clean images")
        for key, path in by_stem(files, base, scan.problems).items():
            lq = file_ref(path, root, crop=Crop("left_half"))
            gt = file_ref(path, root, crop=Crop("right_half"))
            scan.pairs.append(self._pair(key, lq, gt))
        return scan


@dataclass(frozen=True, kw_only=True)
class Ddn(Dataset):
    """DDN-Data / Rain14000 (Fu et al. 2017): ``rainy_image/{i}_{j}.jpg`` → ``ground_truth/{i}.jpg``,
    14 rainy images per clean one. One tree: train i ≤ ``last_train``, test above; or one tree per split."""

    last_train: int = 900

    def _scan(self, root: Path, split: str) -> Scan:
        single_tree = (root / "rainy_image").is_dir()
        tree = root if single_tree else first_dir(root, _SPLIT_NAMES[split])
        if tree is None:
            raise self._missing(root / "rainy_image", "folder", whole_split=True)

        def in_split(i: int) -> bool:
            if not single_tree:
                return True
            return i <= self.last_train if split == "train" else i > self.last_train

        rainy_dir, clean_dir = tree / "rainy_image", tree / "ground_truth"
        for folder in (rainy_dir, clean_dir):
            if not folder.is_dir():
                raise self._missing(folder, "folder")
        scan = Scan()
        all_clean = by_stem(list_images(clean_dir), clean_dir, scan.problems)
        clean = {k: p for k, p in all_clean.items() if k.isdigit() and in_split(int(k))}
        used: set[Path] = set()
        for key, path in by_stem(list_images(rainy_dir), rainy_dir, scan.problems).items():
            scene = key.split("_")[0]
            if not scene.isdigit() or "_" not in key:
                scan.problems.append(f"'{path}' is not named <i>_<j>; rename or remove it.")
                continue
            if not in_split(int(scene)):
                continue
            if scene not in clean:
                scan.problems.append(
                    f"'{path}' has no clean image '{scene}.*' in '{clean_dir}'; add that image or remove this file."
                )
                continue
            used.add(clean[scene])
            scan.pairs.append(self._pair(key, file_ref(path, root), file_ref(clean[scene], root)))
        unused = [p for p in clean.values() if p not in used]
        if unused:
            scan.notes.append(
                f"{len(unused)} clean image(s) in '{clean_dir}' have no rainy image, e.g. '{unused[0].name}'."
            )
        return scan


_FLAT_LAYOUT = """\
ROOT/rain-001.png, ROOT/norain-001.png, …  (one flat folder; or ROOT/{split}/…, or rain/ and norain/ folders)
or re-packed (PromptIR/Restormer): ROOT/input/NAME.png, ROOT/target/NAME.png
"""

RAIN100L = RainPrefix(
    name="rain100l",
    title="Rain100L",
    degradation="rain",
    splits=("test",),
    metric=_Y,
    expected_counts={"test": 100},
    layout=_FLAT_LAYOUT + "100 test pairs; scored on Y",
)

RAINTRAINL = RainPrefix(
    name="raintrainl",
    title="RainTrainL",
    degradation="rain",
    splits=("train",),
    metric=_Y,
    expected_counts={"train": 200},
    layout=_FLAT_LAYOUT + "200 train pairs; scored on Y",
)

_RAIN200_LAYOUT = """\
ROOT/{train,test}/rain/X2/norain-1x2.png  →  ROOT/{train,test}/norain/norain-1.png
or re-packed: ROOT/{train,test}/{input,target}/1.png
1,800 train / 200 test pairs; scored on Y"""

RAIN200L = Rain200(
    name="rain200l", title="Rain200L", degradation="rain", splits=("train", "test"), metric=_Y,
    expected_counts={"train": 1800, "test": 200}, layout=_RAIN200_LAYOUT,
)

RAIN200H = Rain200(
    name="rain200h", title="Rain200H", degradation="rain", splits=("train", "test"), metric=_Y,
    expected_counts={"train": 1800, "test": 200}, layout=_RAIN200_LAYOUT,
)

DID = SideBySide(
    name="did",
    title="DID-Data (Rain1200)",
    degradation="rain",
    splits=("train", "test"),
    metric=_Y,
    expected_counts={"train": 12000, "test": 1200},
    layout="""\
ROOT/{train,test}/*.jpg (or training/, testing/; sub-folders are searched): each image is
[rainy | clean] side by side, left half rainy, right half clean
or re-packed: ROOT/{train,test}/{input,target}/NAME.jpg
12,000 train / 1,200 test pairs; scored on Y""",
)

DDN = Ddn(
    name="ddn",
    title="DDN-Data (Rain14000)",
    degradation="rain",
    splits=("train", "test"),
    metric=_Y,
    expected_counts={"train": 12600, "test": 1400},
    layout="""\
ROOT/rainy_image/{i}_{j}.jpg (j = 1..14)  →  ROOT/ground_truth/{i}.jpg
train: i <= 900, test: i = 901..1000; or separate trees ROOT/{train,test}/{rainy_image,ground_truth}/
12,600 train / 1,400 test pairs; scored on Y""",
)
