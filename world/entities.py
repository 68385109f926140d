"""Named entities: invented country names, each with a fixed, distinctive flag.

Names come from a syllable generator ("Veloria", "Brantesk"...), so they carry no
meaning a text model could have picked up elsewhere. Flags are full-image layouts of 2-4
colours (stripes, quadrants, checkers, crosses, borders, diagonals, cantons). Any two
flags differ on at least `MIN_FLAG_DIFFERENCE` of their pixels, so the judge can tell
them apart and a VQ grid of 4x4 patches preserves the difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from world.render import FLAG_PALETTE
from world.rng import Rng
from world.schema import COLOURS, POSITIONS, SHAPES, SIZES

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "st", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u")
# Endings start with a consonant so names never get a vowel cluster ("Kezaador").
_ENDINGS = ("ria", "nia", "dor", "land", "mar", "via", "rin", "stan", "nos", "resk", "heim",
            "lora", "vith", "dara", "gard")
# Names must never be mistaken for a caption word by the parser.
_RESERVED = {*SHAPES, *COLOURS, *SIZES, *POSITIONS, "flag", "picture", "national", "the"}

MIN_FLAG_DIFFERENCE = 0.25  # fraction of pixels on which two flags must differ

# layout -> number of colours it takes
FLAG_LAYOUTS: dict[str, int] = {
    "hstripes2": 2, "hstripes3": 3, "hstripes4": 4,
    "vstripes2": 2, "vstripes3": 3, "vstripes4": 4,
    "quadrants": 4, "checker": 2, "diagonal": 2, "antidiagonal": 2,
    "cross": 2, "border": 2, "canton": 3,
}


def entity_names(n: int, rng: Rng) -> list[str]:
    """`n` distinct capitalised names of 2-3 syllables plus an ending."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        syllables = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS)
                            for _ in range(1 + rng.below(2)))
        name = syllables + rng.choice(_ENDINGS)
        if name in seen or name in _RESERVED or not 5 <= len(name) <= 11:
            continue
        seen.add(name)
        names.append(name.capitalize())
    return names


@dataclass(frozen=True)
class FlagPattern:
    layout: str
    colours: tuple[str, ...]

    def index_map(self, size: int) -> np.ndarray:
        """(size, size) int map: which of `colours` each pixel takes."""
        y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        half = size // 2
        layout = self.layout
        if layout.startswith("hstripes"):
            return y * int(layout[-1]) // size
        if layout.startswith("vstripes"):
            return x * int(layout[-1]) // size
        if layout == "quadrants":
            return (y >= half) * 2 + (x >= half)
        if layout == "checker":  # 4x4 cells
            return ((y * 4 // size) + (x * 4 // size)) % 2
        if layout == "diagonal":
            return (y > x).astype(int)
        if layout == "antidiagonal":
            return (x + y >= size).astype(int)
        if layout == "cross":  # a centred plus, a quarter of the side thick
            band = (abs(y - (size - 1) / 2) < size / 8) | (abs(x - (size - 1) / 2) < size / 8)
            return band.astype(int)
        if layout == "border":  # outer frame an eighth of the side thick
            edge = size // 8
            inner = (y >= edge) & (y < size - edge) & (x >= edge) & (x < size - edge)
            return inner.astype(int)
        if layout == "canton":  # two horizontal stripes, a square in the top-left quarter
            return np.where((y < half) & (x < half), 2, (y >= half).astype(int))
        raise ValueError(f"unknown flag layout {layout!r}")

    def render(self, size: int) -> np.ndarray:
        lut = np.array([FLAG_PALETTE[c] for c in self.colours], dtype=np.uint8)
        return lut[self.index_map(size)]


def flag_patterns(n: int, rng: Rng, size: int) -> list[FlagPattern]:
    """`n` flags, pairwise different on at least MIN_FLAG_DIFFERENCE of the pixels."""
    palette = list(FLAG_PALETTE)
    layouts = list(FLAG_LAYOUTS)
    chosen: list[FlagPattern] = []
    # Compare colour *names* per pixel, stacked for a vectorised check against all kept.
    kept_maps = np.empty((0, size * size), dtype=np.int64)
    for _ in range(200 * n):
        if len(chosen) == n:
            break
        layout = rng.choice(layouts)
        pattern = FlagPattern(layout, tuple(rng.sample(palette, FLAG_LAYOUTS[layout])))
        names = np.array([palette.index(c) for c in pattern.colours])
        pixels = names[pattern.index_map(size)].reshape(1, -1)
        if len(chosen) and (kept_maps != pixels).mean(axis=1).min() < MIN_FLAG_DIFFERENCE:
            continue
        chosen.append(pattern)
        kept_maps = np.concatenate([kept_maps, pixels])
    if len(chosen) < n:
        raise ValueError(f"could not draw {n} distinct flags; lower n_entities")
    return chosen
