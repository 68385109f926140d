"""Request images: decode and validate what clients send, encode what we answer.

Everything a client sends passes through here before any model sees it:
- base64 (plain or a `data:` URL) is decoded strictly;
- only real image formats are opened (PNG, JPEG, WebP, GIF, BMP);
- the header's dimensions are checked *before* pixels are decoded, so a small file that
  claims 20000×20000 pixels (a decompression bomb) costs nothing (413);
- truncated or corrupt files and 0-sized images are invalid input (422).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import InvalidRequest, PayloadTooLarge

ALLOWED_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP")  # MPO: many camera JPEGs


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 4 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_side: int = 4096


def decode_base64(data: str, param: str, max_bytes: int) -> bytes:
    """Strict base64 (standard or URL-safe alphabet, optional `data:...;base64,` prefix)."""
    if not isinstance(data, str) or not data.strip():
        raise InvalidRequest("image is empty", param=param, code="invalid_image")
    text = data.strip()
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise InvalidRequest(
                "data URL must be base64-encoded (data:image/png;base64,...)", param=param,
                code="invalid_base64",
            )
    text = "".join(text.split())
    if len(text) * 3 // 4 > max_bytes:
        raise PayloadTooLarge(
            f"image is larger than {max_bytes} bytes", param=param, code="image_too_large"
        )
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            "image is not valid base64", param=param, code="invalid_base64"
        ) from None
    if not raw:
        raise InvalidRequest("image is empty", param=param, code="invalid_image")
    return raw


def open_image(data: bytes, param: str, limits: ImageLimits) -> Image.Image:
    """Open, check the header's size, then decode fully. Returns a loaded PIL image."""
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(
            f"image is larger than {limits.max_bytes} bytes", param=param, code="image_too_large"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(
            "image dimensions are too large (decompression bomb guard)", param=param,
            code="image_too_large",
        ) from None
    except UnidentifiedImageError:
        raise InvalidRequest(
            f"not a supported image (allowed: {', '.join(ALLOWED_FORMATS)})", param=param,
            code="invalid_image",
        ) from None
    except Exception:
        raise InvalidRequest("image could not be read", param=param, code="invalid_image") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidRequest(
            f"image has no pixels ({width}x{height})", param=param, code="invalid_image"
        )
    if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height}; the limit is {limits.max_side} px a side and "
            f"{limits.max_pixels} pixels",
            param=param,
            code="image_too_large",
        )
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except Exception:
        raise InvalidRequest(
            "image data is truncated or corrupt", param=param, code="invalid_image"
        ) from None
    return img


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info


def to_rgb(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8. Transparent areas are composited over white."""
    if has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def to_mask(img: Image.Image) -> np.ndarray:
    """(H, W) bool, True = regenerate.

    With an alpha channel (the OpenAI convention): fully transparent pixels (alpha 0).
    Without one: white pixels (value > 127), the usual inpainting convention.
    """
    if has_alpha(img):
        alpha = np.asarray(img.convert("RGBA"), dtype=np.uint8)[..., 3]
        return alpha == 0
    return np.asarray(img.convert("L"), dtype=np.uint8) > 127


def box_mask(box: tuple[int, int, int, int], height: int, width: int, param: str) -> np.ndarray:
    """A mask from a pixel box (x0, y0, x1, y1), half-open, True inside."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise InvalidRequest(
            f"box {list(box)} must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}",
            param=param,
            code="invalid_box",
        )
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def decode_rgb_b64(data: str, param: str, limits: ImageLimits) -> np.ndarray:
    return to_rgb(open_image(decode_base64(data, param, limits.max_bytes), param, limits))


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (H, W, 3) uint8 to size (H, W); a no-op when it already has that size."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a bool mask; a target pixel is masked when any part of its area was."""
    h, w = size
    if mask.shape == (h, w):
        return mask
    as_img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(as_img.resize((w, h), Image.Resampling.BOX)) > 0


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def png_b64(image: np.ndarray) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
