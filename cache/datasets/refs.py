"""What a dataset lists: ``Pair``s of lazy ``ImageRef``s (a file, part of a file, a .mat block, or a
synthetic image), and how each one is turned into pixels.

Listing never decodes; ``ImageRef.load()`` does, returning (H,W,3) uint8, or uint16 for 16-bit files.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ...errors import DatasetError, ImageReadError
from ..images import image_size, read_image
from .synth import Synth, render

NOISE_CONVENTIONS = ("promptir", "round")


@dataclass(frozen=True)
class Crop:
    """Keep part of a decoded image.

    ``left_half`` / ``right_half``: the two halves of a side-by-side pair (DID-Data), each ``W // 2`` wide.
    ``centre``: centre-crop to ``size`` (H, W), or to the size of the image file ``like`` (read from its
    header at load time); an image already that size or smaller is left as it is.
    """

    kind: Literal["left_half", "right_half", "centre"]
    size: tuple[int, int] | None = None
    like: Path | None = None

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) after cropping an image of ``height`` × ``width``."""
        if self.kind in ("left_half", "right_half"):
            return height, width // 2
        target_h, target_w = self.size if self.size is not None else image_size(self.like)
        if height < target_h or width < target_w:
            return height, width
        return target_h, target_w

    def apply(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        half = width // 2
        if self.kind == "left_half":
            return image[:, :half]
        if self.kind == "right_half":
            return image[:, half : 2 * half]
        target_h, target_w = self.size if self.size is not None else image_size(self.like)
        if height < target_h or width < target_w or (height, width) == (target_h, target_w):
            return image
        top, left = (height - target_h) // 2, (width - target_w) // 2
        return image[top : top + target_h, left : left + target_w]


@dataclass(frozen=True)
class MatBlock:
    """Block ``index`` of array ``name`` in a MATLAB file shaped (rows, cols, H, W, 3) (SIDD validation)."""

    name: str
    index: tuple[int, int]


@dataclass(frozen=True)
class Noise:
    """Additive white Gaussian noise made by us on a clean uint8 image.

    ``sigma`` is on the 0..255 scale. The noise is ``standard_normal · sigma`` drawn from a generator seeded
    by a hash of (``seed``, ``stream``) — ``stream`` is the image id — so it does not depend on order or on
    which process loads it. Conventions (the result must be uint8 to be stored):
      - ``promptir``: clip(clean + noise, 0, 255) then truncate to uint8, as PromptIR's data code does;
      - ``round``: clip, then round to nearest.
    Restormer's test convention (float ``clean/255 + randn·σ/255``, not clipped) cannot be stored as uint8
    and is therefore not offered. ``grey`` draws one noise plane for all channels (Set12, BSD68).
    """

    sigma: float
    convention: str = "promptir"
    seed: int = 0
    stream: str = ""
    grey: bool = False

    def apply(self, clean: np.ndarray) -> np.ndarray:
        if clean.dtype != np.uint8:
            raise DatasetError(f"Synthetic noise needs 8-bit clean images, got {clean.dtype} for '{self.stream}'.")
        digest = hashlib.sha256(f"{self.seed}/{self.stream}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        shape = clean.shape[:2] + ((1,) if self.grey else (clean.shape[2],))
        noisy = np.clip(clean.astype(np.float64) + rng.standard_normal(shape) * self.sigma, 0.0, 255.0)
        if self.convention == "round":
            noisy = np.rint(noisy)
        return noisy.astype(np.uint8)


@dataclass(frozen=True)
class ImageRef:
    """How to load one image. ``key`` names its content uniquely and machine-independently (path relative
    to the dataset root plus modifiers); the cache stores one image per key."""

    key: str
    path: Path | None = None
    crop: Crop | None = None
    block: MatBlock | None = None
    noise: Noise | None = None
    synth: Synth | None = None

    def size(self) -> tuple[int, int]:
        """(H, W) of ``load()``'s result, from file headers (or the spec) without decoding pixels."""
        if self.synth is not None:
            height, width = self.synth.size
        elif self.block is not None:
            height, width = _mat_shape(self.path, self.block.name)[2:4]
        else:
            height, width = image_size(self.path)
        if self.crop is not None:
            height, width = self.crop.output_size(height, width)
        return height, width

    def load(self) -> np.ndarray:
        """Decode: (H,W,3) uint8, or uint16 for 16-bit files (DPDD)."""
        if self.synth is not None:
            image = render(self.synth)
        elif self.block is not None:
            image = _mat_block(self.path, self.block)
        else:
            image = read_image(self.path)
        if self.crop is not None:
            image = self.crop.apply(image)
        if self.noise is not None:
            image = self.noise.apply(image)
        return image


@dataclass(frozen=True)
class Pair:
    """One training/test example. ``gt_key`` is shared by pairs that share one clean image (SOTS, DDN)."""

    id: str
    lq: ImageRef
    gt: ImageRef | None
    gt_key: str = ""
    degradation: str = ""  # "blur", "haze", "rain", "noise", … (the dataset's task)


def file_ref(path: Path, root: Path, crop: Crop | None = None, noise: Noise | None = None) -> ImageRef:
    """An ``ImageRef`` for a file under ``root``; its key is the relative path plus the modifiers."""
    key = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
    if crop is not None:
        key += f"#{crop.kind}" + (f"{crop.size[0]}x{crop.size[1]}" if crop.size else "")
    if noise is not None:
        key += f"#noise-{noise.convention}-s{noise.sigma:g}-seed{noise.seed}"
    return ImageRef(key=key, path=path, crop=crop, noise=noise)


def mat_ref(path: Path, root: Path, name: str, index: tuple[int, int]) -> ImageRef:
    key = f"{path.relative_to(root).as_posix()}[{index[0]},{index[1]}]"
    return ImageRef(key=key, path=path, block=MatBlock(name, index))


_MAT_LOCK = threading.Lock()  # loaders run in threads: load each .mat once, not once per thread


def _mat_array(path: Path, name: str) -> np.ndarray:
    with _MAT_LOCK:
        return _load_mat_array(path, name)


@functools.lru_cache(maxsize=2)
def _load_mat_array(path: Path, name: str) -> np.ndarray:
    """The whole array ``name`` of a .mat file, loaded once per process (SIDD's are ≈ 250 MB each)."""
    from scipy.io import loadmat

    try:
        contents = loadmat(path, variable_names=[name])
    except (OSError, ValueError, NotImplementedError) as exc:
        raise ImageReadError(f"MATLAB file '{path}' could not be read ({exc}); re-download it.") from exc
    if name not in contents:
        raise ImageReadError(f"MATLAB file '{path}' has no array '{name}'; check that it is the right file.")
    array = contents[name]
    if array.ndim != 5 or array.shape[-1] != 3:
        raise ImageReadError(f"Array '{name}' in '{path}' has shape {array.shape}, not (rows, cols, H, W, 3).")
    return array


@functools.lru_cache(maxsize=8)
def _mat_shape(path: Path, name: str) -> tuple[int, ...]:
    """Shape of array ``name`` in a .mat file, from its header (scipy.io.whosmat)."""
    from scipy.io import whosmat

    try:
        shapes = {n: shape for n, shape, _ in whosmat(path)}
    except (OSError, ValueError, NotImplementedError) as exc:
        raise ImageReadError(f"MATLAB file '{path}' could not be read ({exc}); re-download it.") from exc
    if name not in shapes:
        raise ImageReadError(f"MATLAB file '{path}' has no array '{name}'; check that it is the right file.")
    return tuple(shapes[name])


def _mat_block(path: Path, block: MatBlock) -> np.ndarray:
    array = _mat_array(path, block.name)
    row, col = block.index
    return np.ascontiguousarray(array[row, col]).astype(np.uint8, copy=False)
