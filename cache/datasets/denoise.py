"""Denoising: SIDD (real noise) and the clean-only sets that get synthetic Gaussian noise.

Gaussian sets take options (``get_dataset("cbsd68", sigma=50)`` or ``dataset.with_options(sigma=50)``):
``sigma`` (0..255 scale, default 25; 15/25/50 are the standard levels), ``noise`` (the convention, see
``refs.Noise``; default ``"promptir"``) and ``seed`` (default 0). The noisy image of pair ``id`` is the same
on every machine and in every order: its generator is seeded by a hash of (seed, id).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ...errors import DatasetError
from .base import Dataset, Scan, by_stem, first_dir, list_images, natural_key
from .refs import NOISE_CONVENTIONS, Noise, file_ref, mat_ref

SIDD_MAT = {"lq": "ValidationNoisyBlocksSrgb", "gt": "ValidationGtBlocksSrgb"}  # file stem = array name


@dataclass(frozen=True, kw_only=True)
class Sidd(Dataset):
    """SIDD (Abdelhamed et al. 2018). train: SIDD-Medium sRGB scene folders, ``*_NOISY_*`` → ``*_GT_*``;
    test: the 40×32 validation blocks of 256² in two .mat files (the benchmark's GT is not public)."""

    def _scan(self, root: Path, split: str) -> Scan:
        return self._scan_train(root) if split == "train" else self._scan_blocks(root)

    def _scan_train(self, root: Path) -> Scan:
        data = first_dir(root / "SIDD_Medium_Srgb", ("Data",)) or first_dir(root, ("Data",))
        if data is None:
            raise self._missing(root / "SIDD_Medium_Srgb" / "Data", "folder", whole_split=True)
        scan = Scan()
        for scene in sorted((d for d in data.iterdir() if d.is_dir()), key=lambda d: natural_key(d.name)):
            files = {p.name: p for p in list_images(scene)}
            paired: set[str] = set()
            for name, noisy in files.items():
                if "NOISY" not in name:
                    continue
                clean_name = name.replace("NOISY", "GT")
                clean = files.get(clean_name)
                if clean is None:
                    scan.problems.append(
                        f"'{noisy}' has no clean image '{clean_name}' beside it; add that image or remove this file."
                    )
                    continue
                paired.update((name, clean.name))
                pair_id = f"{scene.name}/{noisy.stem}"
                scan.pairs.append(self._pair(pair_id, file_ref(noisy, root), file_ref(clean, root)))
            for name, path in files.items():
                if "GT" in name and name not in paired:
                    scan.problems.append(f"'{path}' has no noisy image beside it; add that image or remove this file.")
        return scan

    def _scan_blocks(self, root: Path) -> Scan:
        from scipy.io import whosmat

        paths = {}
        for role, name in SIDD_MAT.items():
            found = [p for p in (root / f"{name}.mat", *sorted(root.glob(f"*/{name}.mat"))) if p.is_file()]
            if not found:
                raise self._missing(root / f"{name}.mat", "file", whole_split=True)
            paths[role] = found[0]
        shapes = {}
        for role, path in paths.items():
            try:
                shapes[role] = dict((n, s) for n, s, _ in whosmat(path)).get(SIDD_MAT[role])
            except (OSError, ValueError, NotImplementedError) as exc:
                raise DatasetError(
                    f"SIDD file '{path}' is not a readable MATLAB v5 file ({exc}); re-download it."
                ) from exc
            if shapes[role] is None or len(shapes[role]) != 5:
                raise DatasetError(
                    f"SIDD file '{path}' has no 5-D array '{SIDD_MAT[role]}'; check that it is the validation file."
                )
        if shapes["lq"] != shapes["gt"]:
            raise DatasetError(
                f"SIDD files '{paths['lq']}' and '{paths['gt']}' hold different block grids; re-download them."
            )
        rows, cols = shapes["lq"][:2]
        scan = Scan()
        for row in range(rows):
            for col in range(cols):
                lq = mat_ref(paths["lq"], root, SIDD_MAT["lq"], (row, col))
                gt = mat_ref(paths["gt"], root, SIDD_MAT["gt"], (row, col))
                scan.pairs.append(self._pair(f"block{row:02d}_{col:02d}", lq, gt))
        return scan


@dataclass(frozen=True, kw_only=True)
class GaussianSet(Dataset):
    """A clean-only image set; each pair's degraded image is the clean one plus Gaussian noise made here.

    Images are all those under ROOT (searched recursively), or under the first of ``subfolders`` present."""

    sigma: float = 25.0
    noise: str = "promptir"
    seed: int = 0
    grey: bool = False  # grey benchmark (Set12, BSD68): one noise plane shared by the 3 channels
    subfolders: tuple[str, ...] = ()

    def options(self) -> dict:
        return {"sigma": self.sigma, "noise": self.noise, "seed": self.seed}

    def with_options(self, **options) -> GaussianSet:
        unknown = sorted(set(options) - {"sigma", "noise", "seed"})
        if unknown:
            raise DatasetError(f"Dataset '{self.name}' takes options sigma, noise and seed, not {', '.join(unknown)}.")
        sigma = float(options.get("sigma", self.sigma))
        noise = options.get("noise", self.noise)
        if not 0 < sigma <= 255:
            raise DatasetError(f"Noise sigma {sigma:g} is out of range; give a value in (0, 255], e.g. 15, 25 or 50.")
        if noise not in NOISE_CONVENTIONS:
            raise DatasetError(
                f"Noise convention '{noise}' is not available; choose one of {', '.join(NOISE_CONVENTIONS)} "
                "(un-clipped float noise, as in Restormer's tests, cannot be stored as 8-bit images)."
            )
        return dataclasses.replace(self, sigma=sigma, noise=noise, seed=int(options.get("seed", self.seed)))

    def _scan(self, root: Path, split: str) -> Scan:
        base = first_dir(root, self.subfolders) or root
        files = list_images(base, recursive=True)
        if not files:
            raise self._layout_error(base, "any images")
        scan = Scan()
        for key, path in by_stem(files, base, scan.problems).items():
            noise = Noise(self.sigma, self.noise, self.seed, stream=key, grey=self.grey)
            scan.pairs.append(self._pair(key, file_ref(path, root, noise=noise), file_ref(path, root)))
        return scan


SIDD = Sidd(
    name="sidd",
    title="SIDD",
    degradation="noise",
    splits=("train", "test"),
    expected_counts={"train": 320, "test": 1280},
    layout="""\
train: ROOT/SIDD_Medium_Srgb/Data/<scene>/0001_NOISY_SRGB_010.PNG → 0001_GT_SRGB_010.PNG (NOISY→GT)
test (the validation blocks): ROOT/ValidationNoisyBlocksSrgb.mat, ROOT/ValidationGtBlocksSrgb.mat
(40x32 blocks of 256x256, MATLAB v5; ids blockII_JJ)
320 train pairs / 1,280 test blocks""",
)


def _gaussian(name: str, title: str, split: str, count: int, example: str, grey: bool = False, subfolders=()):
    return GaussianSet(
        name=name,
        title=title,
        degradation="noise",
        splits=(split,),
        grey=grey,
        subfolders=subfolders,
        expected_counts={split: count},
        layout=(
            f"ROOT/{example} …  clean images only (sub-folders are searched"
            + (f"; ROOT/{subfolders[0]}/ is used when present" if subfolders else "")
            + ")\nnoisy = clean + Gaussian noise made here: options sigma (default 25), noise "
            f"(promptir|round), seed\n{count:,} {split} images" + ("; grey" if grey else "")
        ),
    )


BSD400 = _gaussian("bsd400", "BSD400", "train", 400, "test_001.png")
WED = _gaussian("wed", "WED (Waterloo Exploration)", "train", 4744, "00001.bmp")
DIV2K = _gaussian("div2k", "DIV2K", "train", 800, "0001.png", subfolders=("DIV2K_train_HR",))
FLICKR2K = _gaussian("flickr2k", "Flickr2K", "train", 2650, "000001.png", subfolders=("Flickr2K_HR",))
CBSD68 = _gaussian("cbsd68", "CBSD68", "test", 68, "0000.png", subfolders=("original_png",))
KODAK24 = _gaussian("kodak24", "Kodak24", "test", 24, "kodim01.png")
MCMASTER = _gaussian("mcmaster", "McMaster", "test", 18, "1.tif")
URBAN100 = _gaussian("urban100", "Urban100", "test", 100, "img_001.png")
SET12 = _gaussian("set12", "Set12", "test", 12, "01.png", grey=True)
BSD68 = _gaussian("bsd68", "BSD68", "test", 68, "test001.png", grey=True)

GAUSSIAN_SETS = (BSD400, WED, DIV2K, FLICKR2K, CBSD68, KODAK24, MCMASTER, URBAN100, SET12, BSD68)
