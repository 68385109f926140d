"""The demo world as a `build-index` source: `racm3 build-index --source world --input memory`.

`input` names the split (`memory` by default, the knowledge store the demo bundle was
trained against); `world_config` (from the bundle manifest) fixes the seed and sizes, so
the memory is rebuilt deterministically instead of being committed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from retrieval.images import encode_png
from retrieval.sources import SkipReport, SourceItem, register_source
from world import SPLITS, World, WorldConfig


def read_world(
    input: str | os.PathLike,
    size: int,
    report: SkipReport,
    world_config: dict[str, Any] | None = None,
    limit: int | None = None,
    **_: Any,
) -> Iterator[SourceItem]:
    split = str(input) or "memory"
    if split not in SPLITS:
        raise ValueError(f"world split must be one of {SPLITS}, not {split!r}")
    world = World(WorldConfig.from_dict(world_config) if world_config else WorldConfig())
    stop = world.split_size(split) if limit is None else min(limit, world.split_size(split))
    for item in world.iter_split(split, 0, stop):
        image = item.image
        if image.shape[0] != size:  # a bundle at another resolution: resample, don't crop
            image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
        report.items += 1
        yield SourceItem(
            image=image,
            image_bytes=encode_png(image),
            caption=item.caption,
            source=item.id,
            meta={"group": item.group},
        )


register_source("world", read_world)
