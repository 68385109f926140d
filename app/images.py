"""Request images: decode and validate what clients send, encode what we answer.

Everything a client sends passes through here before any model sees it:
- base64 (plain or a `data:` URL) is decoded strictly;
- only real image formats are opened (PNG, JPEG, WebP, GIF, BMP);
- the header's dimensions are checked *before* pixels are decoded, so a small file that
  claims 20000×20000 pixels (a decompression bomb) costs nothing (413);
- pixels are decoded straight to a working size (`decode_image`, `decode_mask`): the
  models work at a few hundred pixels at most, so a large upload is reduced at once,
  with only a stripe of it ever converted at full resolution, on a few threads of
  their own;
- truncated or corrupt files and 0-sized images are invalid input (422).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import io
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.errors import ApiError, InvalidRequest, PayloadTooLarge

T = TypeVar("T")

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


# The working size: images are reduced, by a power of two, to no less than this many
# pixels on their shorter side, which is more than any encoder here takes (CLIP 224-336
# px; the decoder works at the bundle's image size, 32 px in the demo), and no more than
# twice that when the image is larger. A 4096x4096 upload becomes 512x512 (64x fewer
# pixels) before anything else is done with it.
WORKING_MIN_SIDE = 512

# Client images decode on this many threads of their own (`in_decode_thread`). A PNG can
# only be decoded whole (4096x4096 RGBA: 64 MiB), so this bounds what a burst of large
# images takes, whatever the concurrency; and the memory that the C allocator keeps
# for reuse after a decode (per thread) stays with these few threads.
DECODE_THREADS = 2
_decode_pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="image-decode")

# Rows of the reduced image converted per step: the full-resolution copies that mode
# conversions make (e.g. premultiplying alpha) are one stripe, never the whole image.
_STRIPE_ROWS = 16

_EXIF_ORIENTATION = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class DecodedImage:
    """A client's image at the working size. `size` is (width, height) as sent (after
    EXIF orientation), what masks and boxes refer to; `scale` is how many sent pixels
    one working pixel covers per side."""

    rgb: np.ndarray  # (h, w, 3) uint8, transparent areas composited over white
    transparent: np.ndarray | None  # (h, w) bool: some sent pixel under it had alpha 0
    size: tuple[int, int]
    scale: int


@dataclass(frozen=True)
class DecodedMask:
    """A mask image at the working size: True = regenerate. A working pixel is True when
    any sent pixel under it is marked, as `resize_mask` does."""

    mask: np.ndarray  # (h, w) bool
    size: tuple[int, int]
    scale: int


def open_image(data: bytes, param: str, limits: ImageLimits) -> Image.Image:
    """Open and check the header's size. Returns a PIL image whose pixels are not
    decoded yet: nothing large is allocated before the size is known to be allowed."""
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
    return img


def decode_image(data: bytes, param: str, limits: ImageLimits) -> DecodedImage:
    """Decode a client's image straight to the working size (see `WORKING_MIN_SIDE`)."""
    img = open_image(data, param, limits)
    with _invalid_if_corrupt(param):
        loaded = _load_reduced(img)
        alpha = has_alpha(loaded.img)
        rgb = _reduce_in_stripes(loaded, _premultiplied if alpha else _as_rgb)
        transparent = _reduce_in_stripes(loaded, _alpha_zero) if alpha else None
        loaded.release()
    if alpha:
        rgb = _over_white(rgb)
    return DecodedImage(
        rgb=np.asarray(loaded.oriented(rgb).convert("RGB"), dtype=np.uint8).copy(),
        transparent=None if transparent is None else _bool(loaded.oriented(transparent)),
        size=loaded.sent_size,
        scale=loaded.scale,
    )


def decode_mask(data: bytes, param: str, limits: ImageLimits) -> DecodedMask:
    """Decode a mask image: alpha 0 marks the area to regenerate (the OpenAI convention);
    without an alpha channel, white (value > 127) does (the usual inpainting one)."""
    img = open_image(data, param, limits)
    with _invalid_if_corrupt(param):
        loaded = _load_reduced(img)
        marked = _reduce_in_stripes(loaded, _alpha_zero if has_alpha(loaded.img) else _white)
        loaded.release()
    return DecodedMask(
        mask=_bool(loaded.oriented(marked)), size=loaded.sent_size, scale=loaded.scale
    )


async def in_decode_thread(decode: Callable[..., T], *args: Any) -> T:
    """Run `decode(*args)` on the image-decode threads, off the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_decode_pool, functools.partial(decode, *args))


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info


def working_scale(width: int, height: int) -> int:
    """The power of two by which an image of this size is reduced."""
    scale = 1
    while min(width, height) // (scale * 2) >= WORKING_MIN_SIDE:
        scale *= 2
    return scale


@contextlib.contextmanager
def _invalid_if_corrupt(param: str) -> Iterator[None]:
    try:
        yield
    except (ApiError, MemoryError):
        raise
    except Exception:
        raise InvalidRequest(
            "image data is truncated or corrupt", param=param, code="invalid_image"
        ) from None


@dataclass
class _Loaded:
    img: Image.Image | None  # decoded; JPEG already reduced by its decoder
    factor: int  # by which `img` is still to be reduced
    scale: int  # sent pixels per working pixel, per side
    transpose: Image.Transpose | None  # what the EXIF orientation asks for
    sent_size: tuple[int, int]  # (width, height) as the client sees the image

    def release(self) -> None:
        if self.img is not None:
            self.img.close()
        self.img = None

    def oriented(self, img: Image.Image) -> Image.Image:
        return img if self.transpose is None else img.transpose(self.transpose)


_SWAPS_SIDES = (
    Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE,
    Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270,
)


def _load_reduced(img: Image.Image) -> _Loaded:
    """Decode the pixels, as few as the format allows: JPEG decodes straight at 1/2, 1/4
    or 1/8 of its size (`draft`), the others whole."""
    width, height = img.size
    scale = working_scale(width, height)
    if scale > 1 and img.format in ("JPEG", "MPO"):
        img.draft(None, (-(-width // scale), -(-height // scale)))
    img.load()
    transpose = _TRANSPOSE_FOR_ORIENTATION.get(img.getexif().get(_EXIF_ORIENTATION, 1))
    drafted = width // img.size[0]  # 1, 2, 4 or 8: a power of two dividing `scale`
    sent = (height, width) if transpose in _SWAPS_SIDES else (width, height)
    return _Loaded(img, scale // drafted, scale, transpose, sent)


StripeOp = Callable[[Image.Image], Image.Image]


def _reduce_in_stripes(loaded: _Loaded, op: StripeOp) -> Image.Image:
    """`op` (a mode conversion), then reduce by `loaded.factor`, a stripe of rows at a
    time: a conversion's copy is one stripe, never the whole image."""
    img, factor = loaded.img, loaded.factor
    assert img is not None
    width, height = img.size
    step = _STRIPE_ROWS * factor
    if height <= step:
        part = op(img)
        return part.reduce(factor) if factor > 1 else part
    out: Image.Image | None = None
    for top in range(0, height, step):
        part = op(img.crop((0, top, width, min(height, top + step))))
        if factor > 1:
            part = part.reduce(factor)
        if out is None:
            out = Image.new(part.mode, (-(-width // factor), -(-height // factor)))
        out.paste(part, (0, top // factor))
    assert out is not None
    return out


def _as_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def _as_rgba(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGBA" else img.convert("RGBA")


def _premultiplied(img: Image.Image) -> Image.Image:
    """RGBa: colour times alpha, so that averaging pixels weighs each by its opacity."""
    return _as_rgba(img).convert("RGBa")


def _alpha_zero(img: Image.Image) -> Image.Image:
    alpha = _as_rgba(img).getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0)


def _white(img: Image.Image) -> Image.Image:
    return img.convert("L").point(lambda v: 255 if v > 127 else 0)


def _over_white(premultiplied: Image.Image) -> Image.Image:
    """Composite an RGBa image over white: colour + (255 - alpha)."""
    px = np.asarray(premultiplied, dtype=np.uint16)
    rgb = px[..., :3] + (255 - px[..., 3:4])
    return Image.fromarray(np.minimum(rgb, 255).astype(np.uint8), "RGB")


def _bool(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8) > 0


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
    return decode_image(decode_base64(data, param, limits.max_bytes), param, limits).rgb


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
