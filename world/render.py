"""Pixels: the palette, the shape masks and the scene renderer.

Geometry is designed on a 32x32 canvas (an 8x8 grid of 4x4 VQ patches) and scaled for
other sizes. Every attribute is kept unambiguous from pixels:

- sizes are 12 px and 18 px sides (area ratio 2.25);
- position centres are 6-8 px apart and jitter is at most ±2 px (±1 for big objects), so
  a jittered "left" can never reach a jittered "center";
- the background is a dark grey, darker than every object colour;
- colour jitter is a ±12 brightness shift, far smaller than the distance between palette
  colours.

A scene's look beyond its attributes (jitter, background shade, colour shade, flag tint)
is one integer, its *variant*, in the mixed radix of those jitter digits. The world uses
variants to keep splits disjoint (see `world.world`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from world.schema import COLOURS, POSITIONS, SHAPES, SIZES, Attributes

RGB = tuple[int, int, int]

PALETTE: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 80, 240),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "cyan": (40, 210, 220),
    "white": (240, 240, 240),
}
# Flags may also use black: the object scenes never do (their background is dark).
FLAG_PALETTE: dict[str, RGB] = {**PALETTE, "black": (15, 15, 15)}

BACKGROUND_SHADES: tuple[int, ...] = (20, 28, 36, 44, 52, 60)  # grey levels
CANONICAL_BACKGROUND = 2
COLOUR_SHADES: tuple[int, ...] = (-12, 0, 12)  # brightness shift of an object colour
FLAG_TINTS: tuple[int, ...] = (-9, -6, -3, 0, 3, 6, 9)  # per-channel shift of a whole flag

_DESIGN_SIZE = 32
_SIDE = {"small": 12, "big": 18}
_JITTER = {"small": 2, "big": 1}  # big objects have less room to move
_PAIR_JITTER = 2
# (cy, cx) on the 32-px design canvas; big objects sit further in so they stay inside.
_CENTRES = {
    "small": {"left": (16, 8), "right": (16, 24), "top": (8, 16), "bottom": (24, 16),
              "center": (16, 16)},
    "big": {"left": (16, 10), "right": (16, 22), "top": (10, 16), "bottom": (22, 16),
            "center": (16, 16)},
}
_PAIR_CENTRES = {"left of": ((16, 8), (16, 24)), "above": ((8, 16), (24, 16))}


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of a shape filling its box; every shape touches the box."""
    c = (np.arange(side) + 0.5) / side * 2 - 1  # pixel centres in [-1, 1]
    v, u = np.meshgrid(c, c, indexing="ij")  # v: down, u: right
    r2 = u * u + v * v
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.86
    if shape == "circle":
        return r2 <= 1.0
    if shape == "triangle":  # apex up, flat base
        return (abs(u) <= (v + 1) / 2) & (v <= 0.9)
    if shape == "cross":
        return (abs(u) <= 0.34) | (abs(v) <= 0.34)
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.3)
    if shape == "diamond":
        return abs(u) + abs(v) <= 1.05
    raise ValueError(f"unknown shape {shape!r}")


def _scaled(x: float, scale: float) -> int:
    return int(round(x * scale))


def _digits(variant: int, radices: tuple[int, ...]) -> list[int]:
    out = []
    for r in radices:
        variant, d = divmod(variant, r)
        out.append(d)
    return out


def _shaded(colour: str, shade: int) -> np.ndarray:
    return np.clip(np.array(PALETTE[colour]) + shade, 0, 255).astype(np.uint8)


class Renderer:
    """Renders attribute dicts to uint8 (H, W, 3) images; masks and colours precomputed."""

    def __init__(self, image_size: int, flags: Mapping[str, np.ndarray]) -> None:
        if image_size < 16:
            raise ValueError("image_size must be at least 16 to keep attributes legible")
        self.image_size = image_size
        s = image_size / _DESIGN_SIZE
        self._side = {size: _scaled(_SIDE[size], s) for size in SIZES}
        self._jitter = {size: _scaled(_JITTER[size], s) for size in SIZES}
        self._pair_jitter = _scaled(_PAIR_JITTER, s)
        # 3-channel masks so pasting is one np.copyto (faster than boolean-index assignment)
        self._masks = {
            (shape, size): np.repeat(shape_mask(shape, self._side[size])[..., None], 3, axis=2)
            for shape in SHAPES
            for size in SIZES
        }
        # top-left corner of each unjittered box
        self._corner = {
            (size, pos): tuple(_scaled(c, s) - self._side[size] // 2 for c in _CENTRES[size][pos])
            for size in SIZES
            for pos in POSITIONS
        }
        self._pair_corner = {
            rel: tuple(tuple(_scaled(c, s) - self._side["small"] // 2 for c in centre)
                       for centre in centres)
            for rel, centres in _PAIR_CENTRES.items()
        }
        self._colours = {
            (colour, i): _shaded(colour, shade)
            for colour in COLOURS
            for i, shade in enumerate(COLOUR_SHADES)
        }
        self._flags = {name: img.astype(np.int16) for name, img in flags.items()}
        self._check_fits()

    # -- variants ---------------------------------------------------------------------------

    def _radices(self, attrs: Attributes) -> tuple[int, ...]:
        kind = attrs["kind"]
        nbg, nshade, ntint = len(BACKGROUND_SHADES), len(COLOUR_SHADES), len(FLAG_TINTS)
        if kind == "object":
            j = 2 * self._jitter[attrs["size"]] + 1
            return (j, j, nbg, nshade)
        if kind == "pair":
            j = 2 * self._pair_jitter + 1
            return (j, j, j, j, nbg, nshade, nshade)
        if kind == "entity":
            return (ntint, ntint, ntint)
        raise ValueError(f"unknown kind {kind!r}")

    def n_variants(self, attrs: Attributes) -> int:
        return math.prod(self._radices(attrs))

    def canonical_variant(self, attrs: Attributes) -> int:
        """The variant with no jitter: centred, middle background, palette colours."""
        kind = attrs["kind"]
        if kind == "object":
            j = self._jitter[attrs["size"]]
            digits = [j, j, CANONICAL_BACKGROUND, COLOUR_SHADES.index(0)]
        elif kind == "pair":
            j = self._pair_jitter
            digits = [j, j, j, j, CANONICAL_BACKGROUND, *[COLOUR_SHADES.index(0)] * 2]
        else:
            mid = FLAG_TINTS.index(0)
            digits = [mid, mid, mid]
        variant, base = 0, 1
        for d, r in zip(digits, self._radices(attrs), strict=True):
            variant += d * base
            base *= r
        return variant

    # -- rendering --------------------------------------------------------------------------

    def render(self, attrs: Attributes, variant: int) -> np.ndarray:
        radices = self._radices(attrs)
        if not 0 <= variant < math.prod(radices):
            raise ValueError(f"variant {variant} out of range for {attrs}")
        d = _digits(variant, radices)
        kind = attrs["kind"]
        if kind == "entity":
            tint = np.array([FLAG_TINTS[i] for i in d], dtype=np.int16)
            return np.clip(self._flags[attrs["entity"]] + tint, 0, 255).astype(np.uint8)
        img = np.empty((self.image_size, self.image_size, 3), dtype=np.uint8)
        if kind == "object":
            size, j = attrs["size"], self._jitter[attrs["size"]]
            img[:] = BACKGROUND_SHADES[d[2]]
            y, x = self._corner[size, attrs["position"]]
            y, x = y + d[1] - j, x + d[0] - j
            self._paste(img, attrs["shape"], size, attrs["colour"], d[3], y, x)
            return img
        j = self._pair_jitter
        img[:] = BACKGROUND_SHADES[d[4]]
        (y1, x1), (y2, x2) = self._pair_corner[attrs["relation"]]
        y1, x1, y2, x2 = y1 + d[1] - j, x1 + d[0] - j, y2 + d[3] - j, x2 + d[2] - j
        self._paste(img, attrs["shape"], "small", attrs["colour"], d[5], y1, x1)
        self._paste(img, attrs["shape2"], "small", attrs["colour2"], d[6], y2, x2)
        return img

    def _paste(self, img: np.ndarray, shape: str, size: str, colour: str, shade: int,
               y: int, x: int) -> None:
        n = self._side[size]
        np.copyto(img[y : y + n, x : x + n], self._colours[colour, shade],
                  where=self._masks[shape, size])

    def _check_fits(self) -> None:
        # A box pushed outside the canvas would be silently cropped by numpy slicing, which
        # could make two variants render the same image; refuse such geometry outright.
        n = self.image_size
        boxes = [(c, self._side[size], self._jitter[size]) for (size, _), c in self._corner.items()]
        boxes += [(c, self._side["small"], self._pair_jitter)
                  for corners in self._pair_corner.values() for c in corners]
        for (y, x), side, j in boxes:
            if min(y, x) - j < 0 or max(y, x) + j + side > n:
                raise ValueError(f"object geometry does not fit a {n}px canvas")
