"""Flags the world never makes: out-of-distribution knowledge for the memory.

The world's flags are drawn from a fixed set of layouts (`FLAG_LAYOUTS`: stripes,
quadrants, a 4x4 checker, one diagonal, a centred cross, a border, a canton). A user who
appends their own flags to the memory draws whatever they like; these layouts are kinds
the world's generator never produces, so neither the decoder nor CLIP has seen anything
like them. Each flag also differs from every flag of the world on at least
`MIN_FLAG_DIFFERENCE` of its pixels.

    flags = novel_flags(world, 12)   # [NovelFlag(name, layout, image, captions, prompts)]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from world.entities import MIN_FLAG_DIFFERENCE, entity_names
from world.render import FLAG_PALETTE
from world.rng import Rng

IndexMap = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def _checkerboard(y: np.ndarray, x: np.ndarray, s: int) -> np.ndarray:  # 8x8 cells
    return ((y * 8 // s) + (x * 8 // s)) % 2


def _diagonal_tricolour(y: np.ndarray, x: np.ndarray, s: int) -> np.ndarray:
    return np.clip((x + y) * 3 // (2 * s - 1), 0, 2)


def _concentric_squares(y: np.ndarray, x: np.ndarray, s: int) -> np.ndarray:
    ring = np.minimum(np.minimum(y, x), np.minimum(s - 1 - y, s - 1 - x))
    return np.minimum(ring * 6 // s, 2)


def _slanted_stripes(y: np.ndarray, x: np.ndarray, s: int) -> np.ndarray:
    return ((x - y) // max(2, s // 6)) % 2


def _disc(y: np.ndarray, x: np.ndarray, s: int) -> np.ndarray:
    c = (s - 1) / 2
    return ((y - c) ** 2 + (x - c) ** 2 <= (0.3 * s) ** 2).astype(int)


def _band_beside_field(y: np.ndarray, x: np.ndarray, s: int) -> np.ndarray:
    return np.where(x < s // 3, 0, 1 + (y >= s // 2))


def _nordic_cross(y: np.ndarray, x: np.ndarray, s: int) -> np.ndarray:
    band = s // 6
    return ((abs(y - s // 2) < band) | (abs(x - s // 3) < band)).astype(int)


def _hoist_triangle(y: np.ndarray, x: np.ndarray, s: int) -> np.ndarray:
    triangle = x < (s // 2 - abs(y - (s - 1) / 2))
    return np.where(triangle, 2, (y >= s // 2).astype(int))


def _dots_grid(y: np.ndarray, x: np.ndarray, s: int) -> np.ndarray:
    cell = s // 4
    cy, cx = y % cell - (cell - 1) / 2, x % cell - (cell - 1) / 2
    return (cy ** 2 + cx ** 2 <= (cell / 3.2) ** 2).astype(int)


def _chevron(y: np.ndarray, x: np.ndarray, s: int) -> np.ndarray:
    return ((x + abs(y - (s - 1) / 2)) // (s // 4)) % 2


def _saltire(y: np.ndarray, x: np.ndarray, s: int) -> np.ndarray:
    width = s / 8
    return ((abs(y - x) < width) | (abs(y + x - (s - 1)) < width)).astype(int)


def _sun_corner(y: np.ndarray, x: np.ndarray, s: int) -> np.ndarray:
    quarter = (y ** 2 + x ** 2) <= (0.55 * s) ** 2
    return np.where(quarter, 1 + ((y ** 2 + x ** 2) <= (0.3 * s) ** 2), 0)


# layout -> (index map, colours it takes, what a user would call it)
NOVEL_LAYOUTS: dict[str, tuple[IndexMap, int, str]] = {
    "checkerboard": (_checkerboard, 2, "a checkerboard"),
    "diagonal_tricolour": (_diagonal_tricolour, 3, "a diagonal split in three"),
    "concentric_squares": (_concentric_squares, 3, "concentric squares"),
    "slanted_stripes": (_slanted_stripes, 2, "slanted stripes"),
    "disc": (_disc, 2, "a disc on a field"),
    "band_beside_field": (_band_beside_field, 3, "a band beside a field"),
    "nordic_cross": (_nordic_cross, 2, "an off-centre cross"),
    "hoist_triangle": (_hoist_triangle, 3, "a triangle at the hoist"),
    "dots_grid": (_dots_grid, 2, "a grid of dots"),
    "chevron": (_chevron, 2, "chevrons"),
    "saltire": (_saltire, 2, "a diagonal cross"),
    "sun_corner": (_sun_corner, 3, "a quarter sun in the corner"),
}

# How the memory's documents caption an appended flag, and how it is asked for: the
# asking phrasings differ from the stored ones, so a match has to survive a paraphrase.
STORED_CAPTIONS = ("the flag of {name}", "{name}'s national flag")
PROMPTS = ("the flag of {name}", "a picture of the {name} flag")


@dataclass(frozen=True)
class NovelFlag:
    name: str
    layout: str
    colours: tuple[str, ...]
    image: np.ndarray  # (size, size, 3) uint8

    @property
    def captions(self) -> list[str]:
        return [c.format(name=self.name) for c in STORED_CAPTIONS]

    @property
    def prompts(self) -> list[str]:
        return [p.format(name=self.name) for p in PROMPTS]


def render_layout(layout: str, colours: tuple[str, ...], size: int) -> np.ndarray:
    index_map, n_colours, _ = NOVEL_LAYOUTS[layout]
    if len(colours) != n_colours:
        raise ValueError(f"layout {layout!r} takes {n_colours} colours, got {len(colours)}")
    y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    lut = np.array([FLAG_PALETTE[c] for c in colours], dtype=np.uint8)
    return lut[index_map(y, x, size).astype(np.int64)]


def novel_flags(world, n: int, seed: int = 0) -> list[NovelFlag]:
    """`n` named flags, cycling through every novel layout, each unlike all the world's
    flags, with names the world does not use."""
    rng = Rng.from_key("racm3-novel-flags", world.config.seed, seed)
    size = world.config.image_size
    known = np.stack([world.render({"kind": "entity", "entity": e}) for e in world.entities])
    taken = {e.lower() for e in world.entities}
    names = [m for m in entity_names(n + len(taken), rng) if m.lower() not in taken][:n]
    layouts = list(NOVEL_LAYOUTS)
    palette = list(FLAG_PALETTE)
    flags: list[NovelFlag] = []
    for i, name in enumerate(names):
        layout = layouts[i % len(layouts)]
        for _ in range(1000):
            colours = tuple(rng.sample(palette, NOVEL_LAYOUTS[layout][1]))
            image = render_layout(layout, colours, size)
            differs = (known != image[None]).any(-1).mean(axis=(1, 2))
            if differs.min() >= MIN_FLAG_DIFFERENCE:
                break
        else:
            raise ValueError(f"could not draw a {layout} flag unlike the world's")
        flags.append(NovelFlag(name, layout, colours, image))
    return flags
