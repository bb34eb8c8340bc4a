"""guided.metrics against independent implementations: scikit-image for PSNR and BasicSR-style SSIM,
a hand-written scipy float64 formulation of MATLAB's 3-D SSIM."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from tdr.guided.metrics import MetricAverager, MetricConvention, psnr, rgb_to_y, ssim

TOL = 1e-6


# ----------------------------------------------------------------------------- fixtures and references
def _rng(seed=0):
    return np.random.default_rng(seed)


def _noisy(img, sigma, seed=0, peak=255, dtype=np.uint8):
    noise = _rng(seed).normal(0.0, sigma, img.shape)
    return np.clip(np.round(img.astype(np.float64) + noise), 0, peak).astype(dtype)


@pytest.fixture(scope="module")
def astronaut():
    """A natural (H,W,3) uint8 image and a noisy copy, 192x160 crop to keep the tests fast."""
    gt = skdata.astronaut()[40:232, 180:340]
    return _noisy(gt, 12.0, seed=1), gt


@pytest.fixture(scope="module")
def random_pair():
    rng = _rng(2)
    gt = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    return _noisy(gt, 20.0, seed=3), gt


def _skimage_ssim(a, b, data_range=255):
    channel_axis = -1 if a.ndim == 3 else None
    return sk_ssim(
        a.astype(np.float64), b.astype(np.float64), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=data_range, channel_axis=channel_axis,
    )


def _matlab_ssim_reference(a, b, peak=255):
    """MATLAB ssim.m on an integer array, written directly: float64, Gaussian σ 1.5 over every axis,
    11 taps (radius 5 = ceil(3σ)), edge-replicate padding ('nearest'), 'same' size, mean of the map."""
    a, b = a.astype(np.float64), b.astype(np.float64)

    def f(z):
        return gaussian_filter(z, sigma=1.5, mode="nearest", radius=5)

    mu_a, mu_b = f(a), f(b)
    s_a, s_b, s_ab = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_a + s_b + c2))
    return float(ssim_map.mean())


def _y_reference(img):
    """BT.601 luma on the 255 scale from an (H,W,3) uint8 RGB image, float64."""
    rgb = img.astype(np.float64) / 255.0
    return 16.0 + rgb @ np.array([65.481, 128.553, 24.966])


# ----------------------------------------------------------------------------- PSNR
def test_psnr_known_value():
    a = np.full((8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[..., 0] += 3  # MSE = 9/3 = 3
    assert psnr(b, a) == pytest.approx(10 * math.log10(255**2 / 3), abs=1e-12)


@pytest.mark.parametrize("pair", ["random_pair", "astronaut"])
def test_psnr_matches_skimage(pair, request):
    pred, gt = request.getfixturevalue(pair)
    assert psnr(pred, gt) == pytest.approx(sk_psnr(gt, pred, data_range=255), abs=TOL)
    c = 4
    expected = sk_psnr(gt[c:-c, c:-c], pred[c:-c, c:-c], data_range=255)
    assert psnr(pred, gt, crop_border=c) == pytest.approx(expected, abs=TOL)


def test_psnr_y_channel_matches_skimage_on_reference_luma(astronaut):
    pred, gt = astronaut
    expected = sk_psnr(_y_reference(gt), _y_reference(pred), data_range=255)
    assert psnr(pred, gt, y_channel=True) == pytest.approx(expected, abs=TOL)
    assert abs(psnr(pred, gt, y_channel=True) - psnr(pred, gt)) > 0.1


def test_identical_images_give_inf_psnr_and_unit_ssim(astronaut):
    _, gt = astronaut
    assert psnr(gt, gt.copy()) == float("inf")
    assert psnr(gt, gt, y_channel=True, crop_border=3) == float("inf")
    assert ssim(gt, gt.copy()) == pytest.approx(1.0, abs=1e-12)
    assert ssim(gt, gt, variant="matlab3d") == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------- SSIM, BasicSR variant
@pytest.mark.parametrize("pair", ["random_pair", "astronaut"])
def test_ssim_basicsr_matches_skimage(pair, request):
    pred, gt = request.getfixturevalue(pair)
    value = ssim(pred, gt)
    assert value == pytest.approx(_skimage_ssim(pred, gt), abs=TOL)
    assert 0.05 < value < 0.99
    c = 6
    cropped = _skimage_ssim(pred[c:-c, c:-c], gt[c:-c, c:-c])
    assert ssim(pred, gt, crop_border=c) == pytest.approx(cropped, abs=TOL)


def test_ssim_basicsr_y_channel_and_gray(astronaut):
    pred, gt = astronaut
    expected = _skimage_ssim(_y_reference(pred), _y_reference(gt))
    assert ssim(pred, gt, y_channel=True) == pytest.approx(expected, abs=TOL)
    assert ssim(pred[..., 1], gt[..., 1]) == pytest.approx(_skimage_ssim(pred[..., 1], gt[..., 1]), abs=TOL)


def test_ssim_basicsr_rejects_images_smaller_than_the_window():
    a = np.zeros((10, 40, 3), np.uint8)
    with pytest.raises(ValueError, match="11x11"):
        ssim(a, a)


# ----------------------------------------------------------------------------- SSIM, MATLAB 3-D variant
@pytest.mark.parametrize("pair", ["random_pair", "astronaut"])
def test_ssim_matlab3d_matches_reference(pair, request):
    pred, gt = request.getfixturevalue(pair)
    value = ssim(pred, gt, variant="matlab3d")
    assert value == pytest.approx(_matlab_ssim_reference(pred, gt), abs=TOL)
    # Genuinely different from the per-channel valid-window SSIM and from per-channel 2-D MATLAB SSIM.
    assert abs(value - ssim(pred, gt)) > 1e-3
    per_channel = np.mean([_matlab_ssim_reference(pred[..., i], gt[..., i]) for i in range(3)])
    assert abs(value - per_channel) > 1e-4


def test_ssim_matlab3d_y_channel_is_matlab_2d(astronaut):
    pred, gt = astronaut
    expected = _matlab_ssim_reference(_y_reference(pred), _y_reference(gt))
    assert ssim(pred, gt, y_channel=True, variant="matlab3d") == pytest.approx(expected, abs=TOL)


def test_ssim_matlab3d_small_image_and_crop(random_pair):
    pred, gt = random_pair
    tiny_p, tiny_g = pred[:5, :7], gt[:5, :7]  # smaller than the window: replicate padding copes
    assert ssim(tiny_p, tiny_g, variant="matlab3d") == pytest.approx(_matlab_ssim_reference(tiny_p, tiny_g), abs=TOL)
    expected = _matlab_ssim_reference(pred[3:-3, 3:-3], gt[3:-3, 3:-3])
    assert ssim(pred, gt, crop_border=3, variant="matlab3d") == pytest.approx(expected, abs=TOL)


# ----------------------------------------------------------------------------- Y conversion
def test_rgb_to_y_known_values():
    img = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 0, 255]]], np.uint8)
    y = rgb_to_y(img)
    assert y.dtype == np.float64 and y.shape == (1, 4)
    np.testing.assert_allclose(y[0], [235.0, 16.0, 16.0 + 65.481, 16.0 + 24.966], atol=1e-9)
    unit = rgb_to_y(img.astype(np.float64) / 255.0, data_range=1.0)
    np.testing.assert_allclose(unit, y / 255.0, atol=1e-12)
    chw = torch.from_numpy(img).permute(2, 0, 1)  # (3,1,4)
    np.testing.assert_allclose(rgb_to_y(chw, channel_axis=0).numpy(), y, atol=1e-9)


# ----------------------------------------------------------------------------- crop and quantisation
def test_crop_border_ignores_differences_at_the_edge(astronaut):
    _, gt = astronaut
    pred = gt.copy()
    pred[:2] = 255 - pred[:2]
    pred[:, -2:] = 0
    assert math.isfinite(psnr(pred, gt))
    assert psnr(pred, gt, crop_border=2) == float("inf")
    assert ssim(pred, gt) < 0.995
    assert ssim(pred, gt, crop_border=2) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="crop_border"):
        psnr(pred, gt, crop_border=200)


def test_float_inputs_are_rounded_to_uint8(astronaut):
    pred, gt = astronaut
    offset = _rng(4).uniform(-0.49, 0.49, gt.shape)
    as_float = (gt.astype(np.float64) + offset) / 255.0  # rounds back to gt exactly
    assert psnr(as_float, gt) == float("inf")
    assert ssim(as_float.astype(np.float32), gt) == pytest.approx(1.0, abs=1e-12)
    assert psnr(np.clip(as_float + 0.6 / 255, 0, 1), gt) < 60  # > 0.5 levels off: no longer exact
    overshoot = gt.astype(np.float64) / 255.0
    overshoot[gt == 255] = 1.07  # clipped to 255
    overshoot[gt == 0] = -0.05  # clipped to 0
    assert psnr(overshoot, gt) == float("inf")
    assert psnr(as_float, pred) == pytest.approx(psnr(gt, pred), abs=1e-12)


def test_float_images_on_the_255_scale_are_rejected(astronaut):
    _, gt = astronaut
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        psnr(gt.astype(np.float32), gt)


# ----------------------------------------------------------------------------- 16-bit
def test_uint16_uses_data_range_65535():
    rng = _rng(5)
    gt = rng.integers(0, 65536, (40, 48, 3), dtype=np.uint16)
    pred = _noisy(gt, 3000.0, seed=6, peak=65535, dtype=np.uint16)
    assert psnr(pred, gt) == pytest.approx(sk_psnr(gt, pred, data_range=65535), abs=TOL)
    assert ssim(pred, gt) == pytest.approx(_skimage_ssim(pred, gt, data_range=65535), abs=TOL)
    matlab = ssim(pred, gt, variant="matlab3d")
    assert matlab == pytest.approx(_matlab_ssim_reference(pred, gt, peak=65535), abs=TOL)
    as_float = (gt.astype(np.float64) + 0.4) / 65535.0
    assert psnr(as_float, gt) == float("inf")  # dtype of target sets the range
    assert psnr(as_float, gt.astype(np.float64) / 65535.0, data_range=65535) == float("inf")
    mid = rng.integers(1000, 60000, (16, 16, 3)).astype(np.float64)  # no clipping after the shift
    shifted = (mid + 100) / 65535.0, mid / 65535.0  # 100 16-bit levels apart, 0.39 8-bit levels
    assert psnr(*shifted, data_range=65535) == pytest.approx(20 * math.log10(65535 / 100), abs=1e-9)
    # Read as 8-bit data instead: ~39% of pixels land one 8-bit level apart, MSE ≈ 0.39 -> ≈ 52.2 dB.
    assert psnr(*shifted) == pytest.approx(52.2, abs=1.0)
    with pytest.raises(ValueError):
        psnr(pred, (gt >> 8).astype(np.uint8))


# ----------------------------------------------------------------------------- torch inputs
def test_torch_batch_is_the_mean_of_numpy_images(astronaut, random_pair):
    pred, gt = astronaut
    p2, g2 = _noisy(gt, 25.0, seed=7), gt
    batch_p = torch.from_numpy(np.stack([pred, p2])).permute(0, 3, 1, 2).float() / 255.0  # (2,3,H,W)
    batch_g = torch.from_numpy(np.stack([gt, g2])).permute(0, 3, 1, 2).float() / 255.0
    for variant in ("basicsr", "matlab3d"):
        expected = (ssim(pred, gt, variant=variant) + ssim(p2, g2, variant=variant)) / 2
        assert ssim(batch_p, batch_g, variant=variant) == pytest.approx(expected, abs=1e-10)
    expected = (psnr(pred, gt, y_channel=True) + psnr(p2, g2, y_channel=True)) / 2
    assert psnr(batch_p, batch_g, y_channel=True) == pytest.approx(expected, abs=1e-10)
    assert psnr(batch_p[0], torch.from_numpy(gt).permute(2, 0, 1)) == pytest.approx(psnr(pred, gt), abs=1e-12)


def test_shape_mismatch_is_an_error(random_pair):
    pred, gt = random_pair
    with pytest.raises(ValueError, match="shape"):
        psnr(pred[:-1], gt)


# ----------------------------------------------------------------------------- convention and averager
def test_metric_convention_compute_and_from_dict(astronaut):
    pred, gt = astronaut
    conv = MetricConvention.from_dict({"y_channel": True, "crop_border": 4, "ssim": "matlab3d"})
    assert conv == MetricConvention(True, 4, "matlab3d")
    assert MetricConvention.from_dict(conv.to_dict()) == conv
    out = conv.compute(pred, gt)
    assert out["psnr"] == pytest.approx(psnr(pred, gt, y_channel=True, crop_border=4), abs=1e-12)
    c = 4
    expected = _matlab_ssim_reference(_y_reference(pred[c:-c, c:-c]), _y_reference(gt[c:-c, c:-c]))
    assert out["ssim"] == pytest.approx(expected, abs=TOL)
    assert MetricConvention().compute(pred, gt)["ssim"] == pytest.approx(_skimage_ssim(pred, gt), abs=TOL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        conv.crop_border = 0


@pytest.mark.parametrize(
    "bad",
    [{"y_channel": False, "crop": 4}, {"ssim": "gaussian"}, {"crop_border": -1}, {"y_channel": "yes"}],
)
def test_metric_convention_rejects_bad_dicts(bad):
    with pytest.raises(ValueError):
        MetricConvention.from_dict(bad)


def test_unknown_ssim_variant(random_pair):
    with pytest.raises(ValueError, match="matlab3d"):
        ssim(*random_pair, variant="matlab")


def test_metric_averager():
    avg = MetricAverager()
    assert avg.mean() == {}
    avg.add("a.png", {"psnr": 30.0, "ssim": 0.9})
    avg.add("b.png", {"psnr": 20.0, "ssim": 0.7})
    assert len(avg) == 2
    assert avg.rows[1] == {"name": "b.png", "psnr": 20.0, "ssim": 0.7}
    assert avg.mean() == pytest.approx({"psnr": 25.0, "ssim": 0.8})
    with pytest.raises(ValueError):
        avg.add("a.png", {"psnr": 1.0, "ssim": 0.1})
    with pytest.raises(ValueError):
        avg.add("c.png", {"psnr": 1.0})
    avg.add("c.png", {"psnr": float("inf"), "ssim": 1.0})
    assert avg.mean()["psnr"] == float("inf")
    assert avg.mean()["ssim"] == pytest.approx(2.6 / 3)


# ----------------------------------------------------------------------------- RealBlur protocol
def test_realblur_alignment_undoes_a_small_misregistration(astronaut):
    from scipy.ndimage import shift

    from tdr.guided.metrics import realblur_scores

    _, gt = astronaut
    restored = _noisy(gt, 3.0, seed=5)
    moved = np.clip(np.round(np.stack([shift(restored[..., c].astype(np.float64), (1.5, -2.0), order=3,
                                             mode="reflect") for c in range(3)], -1)), 0, 255).astype(np.uint8)
    plain_in_place = psnr(restored, gt)
    in_place = realblur_scores(restored, gt)
    aligned = realblur_scores(moved, gt)
    assert abs(in_place["psnr"] - plain_in_place) < 0.3  # nothing to align: about the plain PSNR
    assert psnr(moved, gt) < plain_in_place - 8  # the shift costs a lot unaligned…
    assert aligned["psnr"] > psnr(moved, gt) + 6  # …and alignment wins most of it back
    assert 0 < aligned["ssim"] <= 1 and aligned["ssim"] > ssim(moved, gt) + 0.1
    from tdr.cache.datasets import get_dataset
    from tdr.guided.evaluate import metric_convention

    for name in ("realblur-j", "realblur-r"):  # what tdr eval builds from a RealBlur store's record
        conv = metric_convention(dict(get_dataset(name).metric))
        assert conv.align and conv.compute(moved, gt) == aligned
