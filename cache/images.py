"""Reading and writing dataset images as (H,W,3) uint8 or uint16 arrays, and their conversions
(to 8 bits, to channel-first float tensors, resized squares) that both halves use.

Pillow decodes 48/64-bit PNGs (16-bit RGB/RGBA, e.g. DPDD) to 8 bits and cannot write them, so 16-bit
colour PNGs are decoded twice by Pillow's own PNG decoder (high bytes, then low bytes) and written by a
small encoder here. TIFFs go through ``tifffile``.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageReadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_READ_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, UnidentifiedImageError, Image.DecompressionBombError,
    struct.error, zlib.error,
)


def read_image(path: str | Path) -> np.ndarray:
    """Decode one image file to (H,W,3) uint8, or uint16 for 16-bit files.

    Grey images are replicated to 3 channels and alpha is dropped. A missing, unreadable or corrupt file
    raises ``ImageReadError`` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"Image '{path}' does not exist; check the dataset folder or re-download it.")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            array = _read_tiff(path)
        else:
            array = _read_pillow(path)
    except ImageReadError:
        raise
    except _READ_ERRORS as exc:
        raise ImageReadError(
            f"Image '{path}' could not be decoded ({exc}); replace the file or re-download the dataset."
        ) from exc
    return _to_rgb(array, path)


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file, read from its header without decoding the pixels."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.pages[0].shape
            return int(shape[0]), int(shape[1])
        with Image.open(path) as im:
            width, height = im.size
        return height, width
    except _READ_ERRORS as exc:
        raise ImageReadError(
            f"Image '{path}' could not be opened ({exc}); replace the file or re-download the dataset."
        ) from exc


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Write a (H,W), (H,W,3) or (H,W,4) uint8 or uint16 array as PNG (16-bit arrays keep 16 bits)."""
    path = Path(path)
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype not in (np.uint8, np.uint16) or not (
        array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
    ):
        raise ValueError(f"write_png takes (H,W[,3|4]) uint8/uint16 arrays, got {array.shape} {array.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype == np.uint8:
        Image.fromarray(array).save(path, format="PNG")
    elif array.ndim == 2:
        Image.fromarray(array.astype("<u2")).save(path, format="PNG")
    else:
        path.write_bytes(_encode_png16(array))


# ------------------------------------------------------------------------------------------ conversions


def to_uint8(img: np.ndarray) -> np.ndarray:
    """(…) uint16 → uint8 by x / 257 rounded (65535 → 255); uint8 arrays are returned as they are."""
    if img.dtype == np.uint16:
        return (img.astype(np.float32) / 257.0).round().astype(np.uint8)
    return img


def to_float_chw(img: np.ndarray):
    """(H,W,C) uint8 / uint16 / float array → (C,H,W) float32 torch tensor: integers scaled to [0,1]
    by 255 or 65535, floats kept as they are."""
    import torch  # the cache itself needs no torch; only the halves that ask for tensors do

    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
    if img.dtype in (np.uint8, np.uint16):
        t.div_(65535.0 if img.dtype == np.uint16 else 255.0)
    return t


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """(H,W,3) uint8 → (size,size,3) uint8, Pillow's bicubic (no copy when it already has that size)."""
    if img.shape[:2] == (size, size):
        return img
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((size, size), Image.Resampling.BICUBIC))


# ---------------------------------------------------------------------------------------------- reading


def _read_pillow(path: Path) -> np.ndarray:
    with open(path, "rb") as fh:
        head = fh.read(33)
    if head.startswith(_PNG_MAGIC) and len(head) == 33 and head[12:16] == b"IHDR":
        bit_depth, colour_type = head[24], head[25]
        if bit_depth == 16 and colour_type in (2, 6):  # 16-bit RGB / RGBA
            return _read_png16_colour(path, "RGB" if colour_type == 2 else "RGBA")
        if bit_depth == 16 and colour_type == 4:
            raise ImageReadError(
                f"Image '{path}' is a 16-bit grey+alpha PNG, which is not supported; convert it to RGB."
            )
    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode.startswith("I;16"):
            return np.asarray(im).astype(np.uint16)
        if mode in ("RGB", "L"):
            return np.asarray(im)
        if mode == "LA":
            return np.asarray(im)[:, :, 0]
        if mode in ("RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1", "RGBX", "RGBa"):
            return np.asarray(im.convert("RGB"))
        raise ImageReadError(f"Image '{path}' has pixel mode {mode}, which is not supported; convert it to 8-bit RGB.")


def _read_png16_colour(path: Path, mode: str) -> np.ndarray:
    """16-bit RGB(A) PNG → (H,W,C) uint16: Pillow's decoder run for the high bytes, then the low bytes."""
    with Image.open(path) as im:
        high = np.asarray(im)  # rawmode "<mode>;16B" keeps the most significant byte of each sample
    with Image.open(path) as im:
        # ";16L" reads every second byte as the high byte: for big-endian PNG samples that is the low byte
        im.tile = [_with_rawmode(tile, f"{mode};16L") for tile in im.tile]
        low = np.asarray(im)
    return (high.astype(np.uint16) << 8) | low.astype(np.uint16)


def _with_rawmode(tile, rawmode: str):
    if hasattr(tile, "_replace"):
        return tile._replace(args=rawmode)
    return (tile[0], tile[1], tile[2], rawmode)


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    array = np.asarray(tifffile.imread(path))
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[2] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar (C,H,W) → (H,W,C)
    return array


def _to_rgb(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(
            f"Image '{path}' holds {array.dtype} pixels, which are not supported; convert it to 8- or 16-bit."
        )
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.ndim == 3 and array.shape[2] in (2, 4):  # grey+alpha / RGBA: drop alpha
        array = array[:, :, :1].repeat(3, axis=2) if array.shape[2] == 2 else array[:, :, :3]
    if array.ndim != 3 or array.shape[2] != 3:
        raise ImageReadError(f"Image '{path}' has shape {array.shape}, not an image of 1, 3 or 4 channels.")
    return np.ascontiguousarray(array)


# ---------------------------------------------------------------------------------------------- writing


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _encode_png16(array: np.ndarray) -> bytes:
    """(H,W,3|4) uint16 → PNG bytes (bit depth 16), each row with the PNG filter that minimises sum |Δ|."""
    height, width, channels = array.shape
    bpp = 2 * channels  # bytes per pixel
    raw = array.astype(">u2").view(np.uint8).reshape(height, width * bpp).astype(np.int16)
    left = np.zeros_like(raw)
    left[:, bpp:] = raw[:, :-bpp]
    up = np.zeros_like(raw)
    up[1:] = raw[:-1]
    up_left = np.zeros_like(raw)
    up_left[1:, bpp:] = raw[:-1, :-bpp]
    # PNG spec §9.4: predictors None, Sub, Up, Average, Paeth
    estimate = left + up - up_left
    dist_left, dist_up, dist_ul = np.abs(estimate - left), np.abs(estimate - up), np.abs(estimate - up_left)
    paeth = np.where((dist_left <= dist_up) & (dist_left <= dist_ul), left, np.where(dist_up <= dist_ul, up, up_left))
    predictions = np.stack([np.zeros_like(raw), left, up, (left + up) // 2, paeth])  # (5,H,row bytes)
    residuals = ((raw[None] - predictions) % 256).astype(np.uint8)
    cost = np.abs(residuals.astype(np.int8).astype(np.int32)).sum(axis=2)  # (5,H)
    best = cost.argmin(axis=0)
    rows = residuals[best, np.arange(height)]
    scanlines = np.concatenate([best.astype(np.uint8)[:, None], rows], axis=1)
    colour_type = 2 if channels == 3 else 6
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (
        _PNG_MAGIC
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6))
        + _chunk(b"IEND", b"")
    )
