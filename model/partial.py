"""Watching a decode: partial images while a job generates, and stopping a job nobody wants.

`ProgressHook` is the decoder's `step_hook` (model/decoder.py) for one decode call. For
every streamed job in the batch (one that carries a `Progress`) it:

- draws partial image i once the job's shown candidate (its first) has generated its
  share of codes: the VQ decode of the codes so far, with the cells not generated yet
  painted gray, so a viewer sees the image form in raster order;
- stops the job's rows as soon as its `Progress` says it was cancelled (the client
  went away), so the batch ends early when nobody else is in it;
- reports the job's token usage once decoding is over.

After the decode, `settle` rewrites stopped rows into blank but well-formed output (code
0 everywhere), so the engine's post-processing never sees a half-finished row; nobody
reads those results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.tokens import EOS_ID, PAD_ID, SRC_ID, TokenSpace, mask_id

NEUTRAL_GRAY = 128  # pixel value of a cell not generated yet

DecodeCodes = Callable[[np.ndarray], np.ndarray]  # (N, h, w) codes -> (N, H, W, 3) uint8


def partial_steps(total: int, count: int) -> list[int]:
    """After how many generated codes each of `count` partial images is drawn: evenly
    spaced and strictly before the last code (the final image follows it). Fewer than
    `count` when there are too few codes to space them."""
    steps = {max(1, total * (i + 1) // (count + 1)) for i in range(count)}
    return sorted(s for s in steps if s < total)


@dataclass
class _Watched:
    progress: Any  # model.jobs.Progress
    rows: range  # the job's output rows, one per candidate
    cells: np.ndarray  # flat grid cells the job generates, in generation order
    base: np.ndarray  # (h*w,) codes shown where nothing is generated (the kept image)
    blank: list[int]  # a well-formed output row of code 0s, for a stopped job
    prompt: Sequence[int]
    original: np.ndarray | None = None  # (H, W, 3) pixels shown outside the edit
    keep: np.ndarray | None = None  # (H, W) bool: where `original` is shown
    steps: list[int] = field(default_factory=list)
    drawn: int = 0
    stopped: bool = False


class ProgressHook:
    def __init__(self, space: TokenSpace, decode: DecodeCodes, watched: list[_Watched]) -> None:
        self.space = space
        self.decode = decode
        self.watched = watched
        for w in watched:
            w.steps = partial_steps(len(w.cells), int(w.progress.partial_images))

    # --- the two task shapes ------------------------------------------------------------

    @classmethod
    def for_images(cls, space: TokenSpace, decode: DecodeCodes, jobs: Sequence[Any],
                   prompts: Sequence[Sequence[int]], per_job: int) -> ProgressHook | None:
        """Caption -> image: every grid cell, in raster order."""
        n = space.image_len
        watched = [
            _Watched(job.progress, range(g * per_job, (g + 1) * per_job), np.arange(n),
                     np.zeros(n, dtype=np.int64), [space.image_offset] * n, prompts[g])
            for g, job in enumerate(jobs) if job.progress is not None
        ]
        return cls(space, decode, watched) if watched else None

    @classmethod
    def for_infill(cls, space: TokenSpace, decode: DecodeCodes, jobs: Sequence[Any],
                   prompts: Sequence[Sequence[int]], infills: Sequence[Any],
                   codes: Sequence[np.ndarray], per_job: int) -> ProgressHook | None:
        """Infilling: the masked runs, one after another; the rest is the job's image."""
        watched = []
        for g, (job, ip) in enumerate(zip(jobs, infills, strict=True)):
            if job.progress is None:
                continue
            src = ip.template.index(SRC_ID) + 1
            cells = np.concatenate([np.arange(s - src, e - src) for s, e in ip.runs])
            blank: list[int] = []
            for j, length in enumerate(ip.run_lengths):
                blank += ([mask_id(j)] if j else []) + [space.image_offset] * length
            watched.append(_Watched(
                job.progress, range(g * per_job, (g + 1) * per_job), cells,
                np.asarray(codes[g]).reshape(-1), [*blank, EOS_ID], prompts[g],
                original=job.image, keep=~job.mask))
        return cls(space, decode, watched) if watched else None

    # --- during the decode --------------------------------------------------------------

    def __call__(self, t: int, tokens: Tensor) -> Tensor | None:
        stop: list[int] = []
        for w in self.watched:
            if w.stopped or w.progress.cancelled:
                w.stopped = True
                stop += list(w.rows)
            elif w.drawn < len(w.steps) and t + 1 >= w.steps[w.drawn]:
                self._maybe_draw(w, tokens[w.rows.start])
        if not stop:
            return None
        rows = torch.zeros(tokens.size(0), dtype=torch.bool)
        rows[stop] = True
        return rows

    def _maybe_draw(self, w: _Watched, row: Tensor) -> None:
        ids = row.tolist()
        codes = [t - self.space.image_offset for t in ids if self.space.is_image(t)]
        while w.drawn < len(w.steps) and len(codes) >= w.steps[w.drawn]:
            w.progress.partial(w.drawn, self._draw(w, codes[: w.steps[w.drawn]]))
            w.drawn += 1

    def _draw(self, w: _Watched, codes: list[int]) -> np.ndarray:
        h, wd = self.space.image_grid
        grid = w.base.copy()
        grid[w.cells[: len(codes)]] = codes
        image = self.decode(grid.reshape(1, h, wd))[0].copy()
        ch, cw = image.shape[0] // h, image.shape[1] // wd
        for cell in w.cells[len(codes):]:
            r, c = divmod(int(cell), wd)
            image[r * ch : (r + 1) * ch, c * cw : (c + 1) * cw] = NEUTRAL_GRAY
        if w.keep is not None and w.original is not None:
            image[w.keep] = w.original[w.keep]
        return image

    # --- after the decode ---------------------------------------------------------------

    def settle(self, out: Tensor, width: int) -> Tensor:
        """`out` padded to `width` columns, with stopped jobs' rows made blank, and usage
        reported for every job that finished."""
        # a copy: the decoder's output is an inference tensor, which refuses in-place writes
        out = torch.nn.functional.pad(out, (0, max(0, width - out.size(1))), value=PAD_ID)
        for w in self.watched:
            if w.stopped:
                blank = torch.full((width,), PAD_ID, dtype=out.dtype)
                blank[: len(w.blank)] = torch.as_tensor(w.blank[:width], dtype=out.dtype)
                out[w.rows.start : w.rows.stop] = blank.to(out.device)
            else:
                text = sum(1 for t in w.prompt if self.space.is_text(int(t)))
                image = sum(1 for t in w.prompt if self.space.is_image(int(t)))
                w.progress.usage(text, image, len(w.cells) * len(w.rows))
        return out

    @property
    def stopped(self) -> bool:
        return any(w.stopped for w in self.watched)
