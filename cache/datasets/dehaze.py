"""Dehazing: RESIDE (Li et al. 2019) ITS/OTS for training, SOTS indoor/outdoor for testing.

Many hazy images share one clear image: hazy ``1400_1.png`` / ``0005_0.8_0.04.jpg`` → clear ``1400.png`` /
``0005.jpg`` by ``name.split('_')[0]``; their pairs share ``gt_key`` so the clear image is stored once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import Dataset, Scan, by_stem, first_dir, list_images
from .refs import Crop, file_ref

HAZY_NAMES = ("hazy", "haze", "synthetic", "input")
CLEAR_NAMES = ("gt", "GT", "clear", "original", "target")


@dataclass(frozen=True, kw_only=True)
class Reside(Dataset):
    """One RESIDE subset: ``hazy/`` (searched recursively, e.g. OTS ``part1..4``) against ``gt/`` or ``clear/``.

    ``subfolder``: where a full SOTS download keeps this subset (``indoor``/``outdoor``).
    ``crop_gt_to_hazy``: centre-crop the clear image to its hazy image's size at load time (some SOTS-indoor
    downloads have 640×480 clear images for 620×460 hazy ones)."""

    subfolder: str = ""
    crop_gt_to_hazy: bool = False

    def _scan(self, root: Path, split: str) -> Scan:
        candidates = [root / split] + ([root / self.subfolder] if self.subfolder else []) + [root]
        for base in candidates:
            hazy_dir, clear_dir = first_dir(base, HAZY_NAMES), first_dir(base, CLEAR_NAMES)
            if hazy_dir and clear_dir:
                break
        else:
            raise self._layout_error(root, f"hazy/ and gt/ (or clear/) folders, nor {split}/ holding them")
        scan = Scan()
        hazy = by_stem(list_images(hazy_dir, recursive=True), hazy_dir, scan.problems)
        clear = by_stem(list_images(clear_dir), clear_dir, scan.problems)
        first_hazy: dict[Path, Path] = {}  # clear image → its first hazy image (the crop reference)
        for key, hazy_path in hazy.items():
            scene = Path(key).name.split("_")[0]
            clear_path = clear.get(scene)
            if clear_path is None:
                scan.problems.append(
                    f"'{hazy_path}' has no clear image '{scene}.*' in '{clear_dir}'; "
                    "add that image or remove this file."
                )
                continue
            first_hazy.setdefault(clear_path, hazy_path)
            crop = Crop("centre", like=first_hazy[clear_path]) if self.crop_gt_to_hazy else None
            scan.pairs.append(self._pair(key, file_ref(hazy_path, root), file_ref(clear_path, root, crop=crop)))
        unused = [path for path in clear.values() if path not in first_hazy]
        if unused:
            scan.notes.append(
                f"{len(unused)} clear image(s) in '{clear_dir}' have no hazy image, e.g. '{unused[0].name}'."
            )
        return scan


_LAYOUT = """\
ROOT/{hazy}/{example_hazy}  →  ROOT/{clear}/{example_clear}   (paired by name.split('_')[0])
also accepted: clear folder named gt/, GT/, clear/, original/ or target/; hazy folder hazy/, haze/,
synthetic/ (sub-folders like part1..4 are searched) or input/; {where}
{size}"""

SOTS_INDOOR = Reside(
    name="sots-indoor",
    title="SOTS-indoor (RESIDE)",
    degradation="haze",
    splits=("test",),
    subfolder="indoor",
    crop_gt_to_hazy=True,
    expected_counts={"test": 500},
    layout=_LAYOUT.format(
        hazy="hazy", example_hazy="1400_1.png", clear="gt", example_clear="1400.png",
        where="ROOT may also be a SOTS download holding indoor/{hazy,gt}",
        size="500 hazy from 50 clear; 640x480 clear images are centre-cropped to the 620x460 hazy size",
    ),
)

SOTS_OUTDOOR = Reside(
    name="sots-outdoor",
    title="SOTS-outdoor (RESIDE)",
    degradation="haze",
    splits=("test",),
    subfolder="outdoor",
    expected_counts={"test": 500},
    layout=_LAYOUT.format(
        hazy="hazy", example_hazy="0005_0.8_0.04.jpg", clear="gt", example_clear="0005.png",
        where="ROOT may also be a SOTS download holding outdoor/{hazy,gt}",
        size="500 hazy images",
    ),
)

ITS = Reside(
    name="its",
    title="ITS (RESIDE indoor training set)",
    degradation="haze",
    splits=("train",),
    expected_counts={"train": 13990},
    layout=_LAYOUT.format(
        hazy="hazy", example_hazy="1_1_0.90179.png", clear="clear", example_clear="1.png",
        where="or the same under ROOT/train/", size="13,990 hazy from 1,399 clear",
    ),
)

OTS = Reside(
    name="ots",
    title="OTS (RESIDE outdoor training set)",
    degradation="haze",
    splits=("train",),
    layout=_LAYOUT.format(
        hazy="hazy", example_hazy="0005_0.8_0.04.jpg", clear="clear", example_clear="0005.jpg",
        where="or the same under ROOT/train/ (PromptIR: synthetic/part1..4 and original/)",
        size="size depends on the download (PromptIR's subset: 72,135)",
    ),
)
