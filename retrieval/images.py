"""Decode untrusted image bytes into the one image form every module uses.

`load_image` turns a file or a byte string into a uint8 (size, size, 3) RGB array:
header checked before any pixel is decoded (decompression bombs are refused), pixels
fully decoded (truncated files are refused), EXIF orientation applied, every Pillow
mode normalised to RGB, then shorter side resized and centre-cropped to `size`.

Anything wrong with the input raises `ImageError` (a `ValueError`) whose `reason` is a
short code ("not_an_image", "truncated", "too_large", "zero_size", "undecodable") that
callers can count; nothing else escapes for bad bytes.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

# 40 Mpx covers any real photo (a 50 MP camera is ~8660x5780 = 50 Mpx, rare in
# caption datasets) while a decoded RGB image of that size stays at ~120 MB.
DEFAULT_MAX_PIXELS = 40_000_000

_WHITE = (255, 255, 255)


class ImageError(ValueError):
    """Bad image input. `reason` is a stable short code for counting skips."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


ImageInput = bytes | str | os.PathLike


def load_image(
    data: ImageInput, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode `data` (encoded bytes or a file path) to uint8 RGB (size, size, 3)."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    name = "<bytes>" if isinstance(data, bytes | bytearray) else str(data)
    if isinstance(data, bytes | bytearray):
        if not data:
            raise ImageError("not_an_image", "empty byte string is not an image")
        fp: io.BufferedIOBase = io.BytesIO(data)
    else:
        fp = open(Path(data), "rb")  # noqa: SIM115 - closed in the finally below
    try:
        image = _open_checked(fp, name, max_pixels)
        # JPEG can decode at 1/2, 1/4, 1/8 scale for free; draft keeps both sides >= size.
        image.draft(None, (size, size))
        try:
            image.load()
        except (OSError, SyntaxError, EOFError) as err:
            raise ImageError("truncated", f"{name}: cannot decode pixels ({err})") from err
        except Exception as err:  # plugins raise assorted types on hostile input
            raise ImageError("undecodable", f"{name}: cannot decode pixels ({err})") from err
        image = _apply_exif_orientation(image, name)
        rgb = to_rgb(image)
    finally:
        fp.close()
    return resize_center_crop(rgb, size)


def _open_checked(fp: io.BufferedIOBase, name: str, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse what must not be decoded."""
    try:
        image = Image.open(fp)
    except UnidentifiedImageError as err:
        raise ImageError(
            "not_an_image", f"{name}: not a recognised image format, or a corrupt header"
        ) from err
    except Image.DecompressionBombError as err:
        raise ImageError("too_large", f"{name}: {err}") from err
    except Exception as err:  # plugins raise assorted types on hostile headers
        raise ImageError("not_an_image", f"{name}: cannot read image header ({err})") from err
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError("zero_size", f"{name}: image has zero size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            "too_large",
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels} (possible decompression bomb)",
        )
    return image


def _apply_exif_orientation(image: Image.Image, name: str) -> Image.Image:
    # A malformed EXIF block must not cost us an otherwise good image.
    try:
        return ImageOps.exif_transpose(image)
    except Exception as err:  # Pillow raises assorted types for broken EXIF
        logger.debug("%s: ignoring unreadable EXIF orientation (%s)", name, err)
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_high_depth_to_uint8(np.asarray(image)), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La")
    if has_alpha or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageError("undecodable", f"cannot convert mode {mode} to RGB ({err})") from err


def _high_depth_to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit / 32-bit / float single-channel pixels to 0..255.

    The file does not say which range it used, so guess from the values: floats in
    [0, 1], integers up to 255, otherwise the 16-bit range.
    """
    values = values.astype(np.float64)
    peak = float(values.max()) if values.size else 0.0
    if np.issubdtype(values.dtype, np.floating) and peak <= 1.0 and values.min() >= 0.0:
        scale = 255.0
    elif peak <= 255.0:
        scale = 1.0
    else:
        scale = 255.0 / 65535.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """Shorter side to `size`, centre crop, as one resample of the cropped source box."""
    width, height = image.size
    side = min(width, height)
    left = (width - side) / 2
    top = (height - side) / 2
    box = (left, top, left + side, top + side)
    if side == size and width == height:
        resized = image
    else:
        # reducing_gap: a cheap box reduction first, then bicubic, for large downscales.
        resized = image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8).copy()


def encode_png(array: np.ndarray) -> bytes:
    """uint8 (H, W, 3) RGB to PNG bytes, for the document store."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3), got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(array, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()
