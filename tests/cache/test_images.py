"""tdr.cache.images: decoding to (H,W,3), 16-bit PNG round trips, clear errors for bad files."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from tdr.errors import ImageReadError, TdrError
from tdr.cache.images import image_size, read_image, write_png


def _rng_image(shape, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


@pytest.mark.parametrize("channels", [3, 4])
def test_png16_colour_round_trip_keeps_16_bits(tmp_path, channels):
    image = _rng_image((37, 29, channels), np.uint16, seed=channels)
    write_png(tmp_path / "a.png", image)
    with Image.open(tmp_path / "a.png") as im:  # a real 16-bit PNG, not an 8-bit one
        assert im.mode == ("RGB" if channels == 3 else "RGBA")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint16 and out.shape == (37, 29, 3)
    np.testing.assert_array_equal(out, image[:, :, :3])
    assert (out & 0xFF).any()  # low bytes survived


def test_png16_encoder_rows_use_every_filter_and_decode_exactly(tmp_path):
    # a smooth ramp plus noise makes different rows prefer different PNG filters
    ramp = np.add.outer(np.arange(64) * 700, np.arange(48) * 300)[:, :, None] + np.array([0, 11, 23])
    image = (ramp + _rng_image((64, 48, 3), np.uint16) % 50).astype(np.uint16)
    write_png(tmp_path / "r.png", image)
    np.testing.assert_array_equal(read_image(tmp_path / "r.png"), image)


def test_png16_grey_is_replicated(tmp_path):
    grey = _rng_image((10, 12), np.uint16)
    write_png(tmp_path / "g.png", grey)
    out = read_image(tmp_path / "g.png")
    assert out.dtype == np.uint16 and out.shape == (10, 12, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


def test_uint8_png_bmp_round_trip_and_grey_rgba(tmp_path):
    rgb = _rng_image((9, 11, 3))
    write_png(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)
    Image.fromarray(rgb).save(tmp_path / "rgb.bmp")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.bmp"), rgb)
    rgba = _rng_image((9, 11, 4))
    write_png(tmp_path / "rgba.png", rgba)
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgba[:, :, :3])
    grey = _rng_image((9, 11))
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (9, 11, 3) and (out == grey[:, :, None]).all()


def test_jpeg_and_tiff(tmp_path):
    flat = np.full((16, 24, 3), (200, 100, 50), np.uint8)
    Image.fromarray(flat).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (16, 24, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - flat).max() <= 3
    tif16 = _rng_image((8, 6, 3), np.uint16)
    tifffile.imwrite(tmp_path / "b.tif", tif16)
    np.testing.assert_array_equal(read_image(tmp_path / "b.tif"), tif16)
    assert image_size(tmp_path / "b.tif") == (8, 6)
    assert image_size(tmp_path / "a.jpg") == (16, 24)


def test_missing_and_corrupt_files_raise_image_read_error_naming_the_path(tmp_path):
    with pytest.raises(ImageReadError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="bad.png") as info:
        read_image(bad)
    assert isinstance(info.value, TdrError)
    # a truncated real PNG (header fine, pixel data cut)
    write_png(tmp_path / "full.png", _rng_image((64, 64, 3)))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image(tmp_path / "cut.png")
    # a truncated 16-bit PNG goes through the other decoder path
    write_png(tmp_path / "full16.png", _rng_image((64, 64, 3), np.uint16))
    data = (tmp_path / "full16.png").read_bytes()
    (tmp_path / "cut16.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut16.png"):
        read_image(tmp_path / "cut16.png")


def test_write_png_rejects_other_dtypes(tmp_path):
    with pytest.raises(ValueError):
        write_png(tmp_path / "f.png", np.zeros((4, 4, 3), np.float32))


def test_conversions_to_8_bits_and_to_channel_first_floats():
    from tdr.cache.images import to_float_chw, to_uint8

    wide = np.array([[[0, 257, 65535]]], np.uint16)  # (1,1,3)
    np.testing.assert_array_equal(to_uint8(wide), np.array([[[0, 1, 255]]], np.uint8))
    narrow = np.array([[[0, 51, 255]]], np.uint8)
    assert to_uint8(narrow) is narrow
    img = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)  # (H,W,C)
    t = to_float_chw(img)
    assert t.shape == (3, 2, 4) and t.dtype.is_floating_point
    np.testing.assert_allclose(t.numpy(), img.transpose(2, 0, 1) / 255.0, rtol=1e-6)
    np.testing.assert_allclose(to_float_chw(wide)[:, 0, 0].numpy(), [0.0, 257 / 65535, 1.0], rtol=1e-6)
    floats = np.full((2, 2, 3), 0.25, np.float32)
    np.testing.assert_array_equal(to_float_chw(floats).numpy(), floats.transpose(2, 0, 1))  # kept as they are
