"""Image grids for reports."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def make_grid(images: Sequence[np.ndarray] | np.ndarray, nrow: int = 8, pad: int = 2,
              pad_value: int = 255) -> np.ndarray:
    """Tile uint8 (H, W, 3) images, `nrow` per row, into one uint8 image."""
    images = [np.asarray(im, dtype=np.uint8) for im in images]
    if not images:
        raise ValueError("make_grid needs at least one image")
    h, w, c = images[0].shape
    if any(im.shape != (h, w, c) for im in images):
        raise ValueError("all images in a grid must have the same shape")
    ncol = min(nrow, len(images))
    nrows = -(-len(images) // ncol)
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y : y + h, x : x + w] = im
    return grid


def save_grid(images: Sequence[np.ndarray] | np.ndarray, path: str | Path, nrow: int = 8,
              scale: int = 4, pad: int = 2) -> Path:
    """Save a PNG grid; `scale` enlarges (nearest neighbour) so 32x32 images stay readable."""
    grid = make_grid(images, nrow=nrow, pad=pad)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
