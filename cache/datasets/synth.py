"""Synthetic images drawn from a spec: a crop of one of scikit-image's bundled photographs, resized,
with one synthetic degradation (the ``demo`` dataset's images). ``ImageRef`` renders a ``Synth`` through
:func:`render`; the datasets that list such images build the specs.

Degradations: motion blur (linear kernel), haze (atmospheric scattering I = J·t + A·(1 − t),
t = exp(−β·d), Koschmieder / McCartney), rain streaks (screen-blended), Gaussian noise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Synth:
    """A synthetic demo image: a crop ``box`` (top, left, height, width) of a bundled photograph resized to
    ``size`` (H, W), then ``degradation`` ("none", "blur", "haze", "rain", "noise") with ``params``; the
    random parts are drawn from ``seed``. Rendered by :func:`render`."""

    photo: str
    box: tuple[int, int, int, int]
    size: tuple[int, int]
    degradation: str
    params: tuple[tuple[str, float], ...] = ()
    seed: int = 0


@functools.lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """A bundled photograph as (H,W,3) uint8 (grey replicated; stereo pairs: the left view)."""
    from skimage import data

    image = getattr(data, name)()
    if isinstance(image, tuple):
        image = image[0]
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = np.ascontiguousarray(image[:, :, :3])
    image.setflags(write=False)
    return image


def render(spec: Synth) -> np.ndarray:
    """Pixels of a ``Synth`` spec: (H,W,3) uint8."""
    from PIL import Image

    top, left, box_h, box_w = spec.box
    crop = photo(spec.photo)[top : top + box_h, left : left + box_w]
    height, width = spec.size
    clean = np.asarray(Image.fromarray(crop).resize((width, height), Image.Resampling.LANCZOS))
    if spec.degradation == "none":
        return clean
    x = clean.astype(np.float64) / 255.0  # (H,W,3) in [0,1]
    params = dict(spec.params)
    rng = np.random.default_rng(spec.seed)
    if spec.degradation == "blur":
        y = _convolve(x, _line_kernel(params["length"], params["angle"]))
    elif spec.degradation == "haze":
        y = _haze(x, params, rng)
    elif spec.degradation == "rain":
        y = _rain(x, params, rng)
    elif spec.degradation == "noise":
        y = x + rng.standard_normal(x.shape) * params["sigma"] / 255.0
    else:
        raise ValueError(f"unknown demo degradation {spec.degradation!r}")
    return np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)


def _line_kernel(length: float, angle: float) -> np.ndarray:
    """Normalised (K,K) kernel of a line segment of ``length`` px at ``angle`` rad, bilinearly splatted."""
    size = int(np.ceil(length)) | 1
    kernel = np.zeros((size + 2, size + 2))
    t = np.linspace(-(length - 1) / 2, (length - 1) / 2, 4 * size)
    ys, xs = (size + 1) / 2 - t * np.sin(angle), (size + 1) / 2 + t * np.cos(angle)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = ys - y0, xs - x0
    for dy, dx, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        np.add.at(kernel, (y0 + dy, x0 + dx), w)
    return kernel / kernel.sum()


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """(H,W,C) * (K,K) with reflected borders, same size out."""
    from scipy.signal import fftconvolve

    pad = kernel.shape[0] // 2
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    return fftconvolve(padded, kernel[:, :, None], mode="valid", axes=(0, 1))


def _smooth_field(shape: tuple[int, int], rng: np.random.Generator, cells: int = 5) -> np.ndarray:
    """Low-frequency random field in [0,1]: a coarse Gaussian grid, cubically upsampled."""
    from scipy.ndimage import map_coordinates

    grid = rng.standard_normal((cells, cells))
    rows = np.linspace(0, cells - 1, shape[0])[:, None].repeat(shape[1], axis=1)
    cols = np.linspace(0, cells - 1, shape[1])[None, :].repeat(shape[0], axis=0)
    field = map_coordinates(grid, [rows, cols], order=3, mode="nearest")
    return (field - field.min()) / (np.ptp(field) + 1e-12)


def _haze(x: np.ndarray, params: dict, rng: np.random.Generator) -> np.ndarray:
    height, width = x.shape[:2]
    ramp = np.linspace(1.0, 0.2, height)[:, None] * np.ones((1, width))  # top of the frame is far
    depth = 0.6 * ramp + 0.4 * _smooth_field((height, width), rng)
    transmission = np.exp(-params["beta"] * depth)[:, :, None]
    airlight = params["airlight"] + params["tint"] * np.array([-1.0, 0.0, 1.0])
    return x * transmission + airlight * (1.0 - transmission)


def _rain(x: np.ndarray, params: dict, rng: np.random.Generator) -> np.ndarray:
    from scipy.signal import fftconvolve

    height, width = x.shape[:2]
    drops = (rng.random((height, width)) < params["density"]) * rng.uniform(0.5, 1.0, (height, width))
    kernel = _line_kernel(params["length"], np.pi / 2 + params["angle"])
    streaks = fftconvolve(drops, kernel, mode="same") * params["length"] * params["brightness"]
    streaks = np.clip(streaks, 0.0, 1.0)[:, :, None]
    return 1.0 - (1.0 - x) * (1.0 - streaks)  # screen blend
