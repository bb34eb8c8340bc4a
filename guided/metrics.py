"""PSNR and SSIM exactly as image-restoration papers compute them.

Conventions (those of BasicSR, which the restoration papers use):

- Metrics are computed on *quantised* images: a float output ``x`` in [0,1] becomes
  ``clip(round(x·L), 0, L)`` with ``L = 255`` (8-bit) or ``L = 65535`` (16-bit, e.g. DPDD) before any
  maths, so a model is scored on the image it would save. ``round`` is round-half-to-even
  (``torch.round``/``numpy.round``), as in BasicSR's ``tensor2img``.
- All maths is float64 on the quantised values, i.e. on the [0, L] scale.
- ``crop_border`` removes that many pixels from each spatial edge first; ``y_channel`` then replaces
  RGB by the BT.601 luma Y (BasicSR's ``test_y_channel``).

Accepted inputs (``pred`` and ``target`` must have the same shape; they may differ in type/dtype):

- numpy arrays, channel-last: ``(H,W)``, ``(H,W,C)`` or a batch ``(B,H,W,C)``;
- torch tensors, channel-first: ``(H,W)``, ``(C,H,W)`` or a batch ``(B,C,H,W)``;
- dtype ``uint8`` (L = 255), ``uint16`` (L = 65535), or floating point in [0,1] (L = 255 unless
  ``data_range=65535`` is given). Float values are clipped to [0,1] (network outputs overshoot a
  little); values above 2 or below -1 are rejected as a sign of a [0,255]-scaled float image.

C is 1 or 3 (RGB order). For a batch the functions return the mean of the per-image values; for
per-image rows, call them once per image (``for p, t in zip(pred, target)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as _msssim_ssim

from ..errors import ConfigError, MissingDependencyError

__all__ = [
    "SSIM_VARIANTS",
    "MetricAverager",
    "MetricConvention",
    "psnr",
    "rgb_to_y",
    "ssim",
]

SSIM_VARIANTS = ("basicsr", "matlab3d")
_DATA_RANGES = (255, 65535)
_INT_RANGES = {torch.uint8: 255, torch.uint16: 65535}

# SSIM window shared by both variants: Gaussian σ = 1.5, 11 taps (radius ceil(3σ) = 5).
_SIGMA = 1.5
_RADIUS = 5


# ----------------------------------------------------------------------------- input handling
def _as_tensor(img: Any, name: str) -> torch.Tensor:
    """numpy (channel-last) or torch (channel-first) image(s) -> torch (B,C,H,W), original dtype."""
    if isinstance(img, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(img))
        if t.ndim == 2:
            return t[None, None]
        if t.ndim == 3:
            return t.permute(2, 0, 1)[None]
        if t.ndim == 4:
            return t.permute(0, 3, 1, 2)
    elif isinstance(img, torch.Tensor):
        t = img.detach()
        if t.ndim == 2:
            return t[None, None]
        if t.ndim == 3:
            return t[None]
        if t.ndim == 4:
            return t
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, not {type(img).__name__}.")
    raise ValueError(f"{name} has shape {tuple(img.shape)}; expected (H,W), one image with channels, or a batch.")


def _range_of(t: torch.Tensor, name: str) -> int | None:
    """The data range implied by an integer dtype, None for floating point."""
    if t.dtype.is_floating_point:
        return None
    if t.dtype in _INT_RANGES:
        return _INT_RANGES[t.dtype]
    raise ValueError(f"{name} has dtype {t.dtype}; use uint8, uint16 or a float image in [0,1].")


def _prepare(pred: Any, target: Any, data_range: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Both images -> quantised float64 (B,C,H,W) on the [0, L] scale, and L."""
    x, y = _as_tensor(pred, "pred"), _as_tensor(target, "target")
    if x.shape != y.shape:
        raise ValueError(f"pred and target differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}.")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {x.shape[1]} (shape {tuple(pred.shape)}).")
    implied = {r for r in (_range_of(x, "pred"), _range_of(y, "target")) if r is not None}
    if data_range is not None and data_range not in _DATA_RANGES:
        raise ValueError(f"data_range must be 255 or 65535, got {data_range}.")
    if len(implied) > 1 or (data_range is not None and implied and data_range not in implied):
        raise ValueError(f"integer dtypes of pred/target ({x.dtype}, {y.dtype}) contradict data_range={data_range}.")
    peak = data_range or (implied.pop() if implied else 255)
    return _quantise(x, peak, "pred"), _quantise(y, peak, "target"), peak


def _quantise(t: torch.Tensor, peak: int, name: str) -> torch.Tensor:
    """Integer -> float64 as is; float in [0,1] -> float64 clip(round(x·peak), 0, peak)."""
    if not t.dtype.is_floating_point:
        return t.to(torch.float64)
    t = t.to(torch.float64)
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf values.")
    if t.numel() and (float(t.max()) > 2.0 or float(t.min()) < -1.0):
        raise ValueError(
            f"{name} is a float image with values in [{float(t.min()):g}, {float(t.max()):g}]; "
            "float images must be in [0,1] (pass uint8/uint16 for integer-valued images)."
        )
    return torch.round(t * peak).clamp_(0, peak)


def _crop(t: torch.Tensor, crop_border: int) -> torch.Tensor:
    if isinstance(crop_border, bool) or not isinstance(crop_border, int) or crop_border < 0:
        raise ValueError(f"crop_border must be a non-negative int, got {crop_border!r}.")
    if crop_border == 0:
        return t
    if min(t.shape[-2:]) <= 2 * crop_border:
        raise ValueError(f"crop_border={crop_border} removes the whole {t.shape[-2]}x{t.shape[-1]} image.")
    return t[..., crop_border:-crop_border, crop_border:-crop_border]


def _preprocess(pred, target, crop_border, y_channel, data_range) -> tuple[torch.Tensor, torch.Tensor, int]:
    x, y, peak = _prepare(pred, target, data_range)
    x, y = _crop(x, crop_border), _crop(y, crop_border)
    if y_channel:
        if x.shape[1] != 3:
            raise ValueError("y_channel=True needs RGB images (3 channels).")
        x = rgb_to_y(x, data_range=peak, channel_axis=1).unsqueeze(1)
        y = rgb_to_y(y, data_range=peak, channel_axis=1).unsqueeze(1)
    return x, y, peak


# ----------------------------------------------------------------------------- public metrics
def rgb_to_y(img: Any, *, data_range: float = 255.0, channel_axis: int = -1):
    """BT.601 luma of an RGB image, in float64, on the input's scale, without rounding.

    ``Y = 16 + 65.481·R + 128.553·G + 24.966·B`` with R,G,B in [0,1] gives Y in [16,235] on the
    255 scale (BasicSR ``bgr2ycbcr(img/255, y_only=True)·255``; BasicSR's numpy path does this in
    float32, here it is float64). ``img``: numpy array or torch tensor whose ``channel_axis`` has
    size 3 (RGB), values on [0, data_range] (e.g. uint8/[0,255] with 255, [0,1] floats with 1.0).
    Returns the same kind of array with the channel axis removed; Y is scaled by data_range/255,
    so white is 235 for data_range=255 and 235/255 for data_range=1.
    """
    is_numpy = isinstance(img, np.ndarray)
    t = torch.from_numpy(np.asarray(img)) if is_numpy else img
    if t.shape[channel_axis] != 3:
        raise ValueError(f"rgb_to_y needs 3 channels on axis {channel_axis}, got shape {tuple(t.shape)}.")
    r, g, b = (c.to(torch.float64) / data_range for c in torch.unbind(t, dim=channel_axis))
    yy = (16.0 + 65.481 * r + 128.553 * g + 24.966 * b) * (data_range / 255.0)
    return yy.numpy() if is_numpy else yy


def psnr(
    pred: Any,
    target: Any,
    *,
    crop_border: int = 0,
    y_channel: bool = False,
    data_range: int | None = None,
) -> float:
    """Peak signal-to-noise ratio in dB: ``10·log10(L² / MSE)``, MSE over all pixels and channels.

    Inputs and quantisation as in the module docstring; ``data_range`` (255 or 65535) is needed
    only for float images of 16-bit data. Identical images give ``float('inf')``. A batch gives the
    mean of the per-image PSNRs (inf if any image is exact).
    """
    x, y, peak = _preprocess(pred, target, crop_border, y_channel, data_range)
    mse = ((x - y) ** 2).flatten(1).mean(1)  # (B,) float64
    per_image = [math.inf if m == 0 else 10.0 * math.log10(peak * peak / m) for m in mse.tolist()]
    return math.fsum(per_image) / len(per_image) if math.inf not in per_image else math.inf


def ssim(
    pred: Any,
    target: Any,
    *,
    crop_border: int = 0,
    y_channel: bool = False,
    variant: str = "basicsr",
    data_range: int | None = None,
) -> float:
    """Structural similarity (Wang et al., TIP 2004), float64, on quantised images.

    ``variant="basicsr"`` (BasicSR ``calculate_ssim``, default of most restoration papers): per
    channel, 11×11 Gaussian window σ 1.5, *valid* filtering (no padding; the map shrinks by 5 px
    per side), C1 = (0.01·L)², C2 = (0.03·L)², map mean per channel, then mean over channels.
    Computed with pytorch-msssim's ``ssim`` given ``data_range=L`` and a float64 window. Needs
    H, W ≥ 11 after cropping.

    ``variant="matlab3d"``: MATLAB's ``ssim(A, ref)`` on an H×W×3 uint8 image, as run by the
    GoPro/HIDE evaluation scripts (``ssim(imread(out), imread(gt))``, e.g. MPRNet's
    ``evaluate_GOPRO_HIDE.m``). MATLAB treats a 3-D array as a *volume* (no channel dimension;
    DataFormat "SSS"); its ``ssim.m`` (Image Processing Toolbox, © 2013–2017) casts integer input
    to double, uses ``radius = 1.5``, ``filtSize = 2·ceil(3·radius)+1 = 11`` and filters with
    ``imgaussfilt3(X, 1.5, 'FilterSize', 11, 'Padding', 'replicate')``: a separable 11×11×11
    Gaussian (σ 1.5 along H, W *and* the channel axis) with edge-replicate padding and 'same' output
    size. Default C = [(0.01·L)², (0.03·L)², C2/2] with unit exponents, which reduces to the usual
    formula; the result is the mean of the H×W×3 map. A 2-D input (e.g. ``y_channel=True``) is the
    2-D case (``imgaussfilt``, same window and padding) — filtering a size-1 axis with replicate
    padding is the identity, so both cases share one code path here. Works for any H, W ≥ 1.

    A batch gives the mean of per-image values.
    """
    if variant not in SSIM_VARIANTS:
        raise ConfigError(f"unknown SSIM variant {variant!r}; choose one of {', '.join(SSIM_VARIANTS)}.")
    x, y, peak = _preprocess(pred, target, crop_border, y_channel, data_range)
    if variant == "basicsr":
        per_image = _ssim_basicsr(x, y, peak)
    else:
        per_image = _ssim_matlab3d(x, y, peak)
    return math.fsum(per_image.tolist()) / per_image.numel()


def _gaussian_1d(device: torch.device) -> torch.Tensor:
    """11-tap Gaussian, σ 1.5, sum 1, float64: exp(-k²/2σ²), k = -5..5."""
    k = torch.arange(-_RADIUS, _RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-(k**2) / (2 * _SIGMA**2))
    return g / g.sum()


def _ssim_basicsr(x: torch.Tensor, y: torch.Tensor, peak: int) -> torch.Tensor:
    """(B,C,H,W) float64 on [0, peak] -> (B,) SSIM, per channel valid-window SSIM averaged."""
    if min(x.shape[-2:]) < 2 * _RADIUS + 1:
        raise ValueError(f"SSIM (basicsr) needs images of at least 11x11 pixels, got {x.shape[-2]}x{x.shape[-1]}.")
    win = _gaussian_1d(x.device).view(1, 1, 1, -1).repeat(x.shape[1], 1, 1, 1)  # (C,1,1,11)
    return _msssim_ssim(x, y, data_range=peak, size_average=False, win=win)


def _replicate_taps(n: int, g: torch.Tensor) -> torch.Tensor:
    """(n,n) matrix M with (M @ v)[i] = Σ_k g[k]·v[clamp(i+k-r, 0, n-1)]: a 1-D 'same' correlation with
    edge-replicate padding, used along the short channel axis (n = 3 ≪ 11 taps)."""
    m = torch.zeros(n, n, dtype=g.dtype, device=g.device)
    for i in range(n):
        for k, w in enumerate(g.tolist()):
            m[i, min(max(i + k - _RADIUS, 0), n - 1)] += w
    return m


def _blur_replicate(v: torch.Tensor, g: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian over C, H and W of (B,C,H,W), replicate padding, 'same' size (imgaussfilt3)."""
    h, w = v.shape[-2:]
    v = torch.einsum("ij,bjhw->bihw", mix, v)
    v = F.pad(v, (_RADIUS, _RADIUS, _RADIUS, _RADIUS), mode="replicate")  # (B,C,H+10,W+10)
    v = sum(g[k] * v[..., k : k + h, :] for k in range(g.numel()))
    return sum(g[k] * v[..., k : k + w] for k in range(g.numel()))


def _ssim_matlab3d(x: torch.Tensor, y: torch.Tensor, peak: int) -> torch.Tensor:
    """(B,C,H,W) float64 on [0, peak] -> (B,) SSIM of each (C,H,W) volume, MATLAB-style."""
    g = _gaussian_1d(x.device)
    mix = _replicate_taps(x.shape[1], g)

    def blur(v: torch.Tensor) -> torch.Tensor:
        return _blur_replicate(v, g, mix)

    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(1)


# ----------------------------------------------------------------------------- conventions
@dataclass(frozen=True)
class MetricConvention:
    """How a dataset is scored: ``{"y_channel": bool, "crop_border": int, "ssim": "basicsr"|"matlab3d"}``."""

    y_channel: bool = False
    crop_border: int = 0
    ssim: str = "basicsr"
    # RealBlur's protocol: align the output to the ground truth (ECC homography) and score inside the
    # warped frame (realblur_scores); crop_border, y_channel and ssim do not apply then
    align: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.y_channel, bool):
            raise ConfigError(f"metric convention: y_channel must be true or false, got {self.y_channel!r}.")
        if isinstance(self.crop_border, bool) or not isinstance(self.crop_border, int) or self.crop_border < 0:
            raise ConfigError(
                f"metric convention: crop_border must be a non-negative integer, got {self.crop_border!r}."
            )
        if self.ssim not in SSIM_VARIANTS:
            raise ConfigError(f"metric convention: ssim must be one of {', '.join(SSIM_VARIANTS)}, got {self.ssim!r}.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetricConvention:
        """Build from a dataset's convention dict; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"metric convention: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}."
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def compute(self, pred: Any, target: Any, *, data_range: int | None = None) -> dict[str, float]:
        """``{"psnr": dB, "ssim": value}`` for one image (or the mean over a batch)."""
        if self.align:
            return realblur_scores(pred, target, data_range=data_range)
        kw = dict(crop_border=self.crop_border, y_channel=self.y_channel, data_range=data_range)
        return {"psnr": psnr(pred, target, **kw), "ssim": ssim(pred, target, variant=self.ssim, **kw)}


# ----------------------------------------------------------------------------- RealBlur protocol
def realblur_scores(pred: Any, target: Any, *, data_range: int | None = None) -> dict[str, float]:
    """RealBlur's evaluation (Rim et al., ECCV 2020, after Köhler et al.) for one RGB image.

    The output, quantised like a saved PNG and scaled to [0,1], is matched in intensity to the ground
    truth (one gain), aligned to it by OpenCV's ECC homography (100 iterations, 5-px Gaussian, on grey
    images), warped (bicubic, reflected borders) and both are masked by the warped frame. PSNR: squared
    error over the mask's pixels; SSIM: scikit-image's Gaussian SSIM map (σ 1.5, population
    covariance) averaged inside the mask, 5 px from the border, per channel, then over channels.
    """
    try:
        import cv2
    except ImportError:
        raise MissingDependencyError("RealBlur's aligned scores need OpenCV: pip install opencv-python-headless.") from None
    from skimage.metrics import structural_similarity

    x, z, peak = _prepare(pred, target, data_range)  # x: output, z: ground truth, float64 on [0, L]
    if x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError(f"RealBlur scores take one RGB image, got shape {tuple(x.shape)}.")
    out = (x[0].permute(1, 2, 0).numpy() / peak).astype(np.float32)
    gt = (z[0].permute(1, 2, 0).numpy() / peak).astype(np.float32)
    scaled = float(np.sum(gt * out) / max(float(np.sum(out * out)), 1e-12)) * out
    warp = np.eye(3, 3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 100, 0)
    try:
        _, warp = cv2.findTransformECC(cv2.cvtColor(gt, cv2.COLOR_RGB2GRAY), cv2.cvtColor(scaled, cv2.COLOR_RGB2GRAY),
                                       warp, cv2.MOTION_HOMOGRAPHY, criteria, None, 5)
    except cv2.error:  # ECC did not converge (e.g. a flat image): score unaligned, as a failed fit would
        warp = np.eye(3, 3, dtype=np.float32)
    h, w = gt.shape[:2]
    aligned = cv2.warpPerspective(scaled, warp, (w, h), flags=cv2.INTER_CUBIC + cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REFLECT)
    mask = cv2.warpPerspective(np.ones_like(scaled), warp, (w, h), flags=cv2.INTER_NEAREST + cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    aligned, gt = (aligned * mask).astype(np.float64), (gt * mask).astype(np.float64)
    err = float(np.sum((gt - aligned) ** 2)) / max(float(np.sum(mask)), 1.0)
    value_psnr = math.inf if err == 0 else 10.0 * math.log10(1.0 / err)
    _, smap = structural_similarity(gt, aligned, channel_axis=2, gaussian_weights=True,
                                    use_sample_covariance=False, data_range=1.0, full=True)
    pad = 5  # (11-tap window − 1) / 2
    smap, m = (smap * mask)[pad:-pad, pad:-pad], mask[pad:-pad, pad:-pad]
    value_ssim = float(np.mean(smap.sum((0, 1)) / np.maximum(m.sum((0, 1)), 1.0)))
    return {"psnr": value_psnr, "ssim": value_ssim}


class MetricAverager:
    """Per-image metric rows and their mean, e.g. ``avg.add("0001.png", conv.compute(out, gt))``."""

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self._names: set[str] = set()

    def add(self, name: str, metrics: Mapping[str, float]) -> None:
        """Record one image's metrics; every row must have the same metric keys; names are unique."""
        if name in self._names:
            raise ValueError(f"image {name!r} was already scored.")
        expected = set(self._rows[0]) - {"name"} if self._rows else set(metrics)
        if set(metrics) != expected:
            raise ValueError(f"image {name!r} has metrics {sorted(metrics)}, the others have {sorted(expected)}.")
        self._names.add(name)
        self._rows.append({"name": name, **{k: float(v) for k, v in metrics.items()}})

    @property
    def rows(self) -> list[dict[str, Any]]:
        """Copies of the rows, in insertion order: ``{"name": str, "<metric>": float, ...}``."""
        return [dict(r) for r in self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    def mean(self) -> dict[str, float]:
        """Mean of each metric over the rows (inf if any value is inf); {} when empty."""
        if not self._rows:
            return {}
        keys = [k for k in self._rows[0] if k != "name"]
        return {k: _mean([r[k] for r in self._rows]) for k in keys}


def _mean(values: list[float]) -> float:
    return math.inf if math.inf in values else math.fsum(values) / len(values)
