"""The stored images' VQ codes as one matrix: image queries matched code for code.

CLIP's image embedding places an image among images it has learned to tell apart; an
image it never learned (a flag, a logo, a new user's picture) lands near unrelated
documents, so dense retrieval by image alone finds the memory's copy of that image for
a quarter of the flags of the demo world (BENCHMARKS.md). The memory already holds what
tells images apart exactly: every document's VQ codes. Two images' *agreement* is the
share of grid cells where their codes are equal: a duplicate scores 1, two variants of
one flag (another tint, another jitter) 0.6-0.95, two different flags under 0.3.

This is the image side of hybrid retrieval (`retrieval/search.py`), as BM25 is the text
side: nothing new is written to a memory version. The matrix is read from the store's
codes column on the first image query (tens of milliseconds per 100k documents) and
lives as long as the loaded version, so it can never disagree with the store; it costs
`codes_per_image` * 2 bytes per document (128 MB for a million 8x8 images). A query
scans it in chunks: about 1 ms per 20k documents and 67 ms per million on one core
(BENCHMARKS.md), small beside the decoding an image query is retrieved for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from retrieval.store import DocumentStore

NO_IMAGE = -1  # the row of a document without image codes: equal to no query code
SCAN_ROWS = 65_536  # rows compared per step: bounds the scan's temporary memory


class CodeIndex:
    """(N, L) stored codes, NO_IMAGE rows for documents without an image."""

    def __init__(self, codes: np.ndarray) -> None:
        if codes.ndim != 2:
            raise ValueError(f"codes must be (N, L), got {codes.shape}")
        self.codes = codes

    @classmethod
    def from_store(cls, store: DocumentStore, codes_per_image: int) -> CodeIndex:
        out = np.full((len(store), codes_per_image), NO_IMAGE, dtype=np.int32)
        start = 0
        for batch in store.batches():
            column = batch.column(4)
            valid = column.is_valid().to_numpy(zero_copy_only=False)
            values = _flat_values(column)
            if values.size != int(valid.sum()) * codes_per_image:
                raise ValueError(f"{store.path}: image codes are not {codes_per_image} per "
                                 "image")
            out[start : start + len(column)][valid] = values.reshape(-1, codes_per_image)
            start += len(column)
        small = out.max(initial=0) < np.iinfo(np.int16).max
        return cls(out.astype(np.int16) if small else out)

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def codes_per_image(self) -> int:
        return int(self.codes.shape[1])

    def agreement(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The share of grid cells where document `ids[j]` has the query's code."""
        ids = np.asarray(ids, dtype=np.int64)
        q = self._query(query)
        return (self.codes[ids] == q).mean(axis=-1, dtype=np.float32)

    def search(self, queries: Sequence[np.ndarray | None], n: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top n (agreement, ids) per query, best first, ties by id; id -1 marks padding
        (a None query, or fewer than n documents with an image)."""
        n = max(1, min(n, len(self)))
        agreement = np.zeros((len(queries), n), dtype=np.float32)
        ids = np.full((len(queries), n), -1, dtype=np.int64)
        for r, query in enumerate(queries):
            if query is None or not len(self):
                continue
            q = self._query(query)
            matches = np.empty(len(self), dtype=np.int32)
            for lo in range(0, len(self), SCAN_ROWS):
                chunk = self.codes[lo : lo + SCAN_ROWS]
                matches[lo : lo + len(chunk)] = np.count_nonzero(chunk == q, axis=1)
            top = np.argpartition(-matches, n - 1)[:n] if n < len(self) else np.arange(len(self))
            top = top[np.lexsort((top, -matches[top]))]
            top = top[matches[top] > 0]  # a document without an image agrees nowhere
            ids[r, : len(top)] = top
            agreement[r, : len(top)] = matches[top] / self.codes_per_image
        return agreement, ids

    def _query(self, query: np.ndarray) -> np.ndarray:
        q = np.asarray(query).reshape(-1)
        if q.size != self.codes_per_image:
            raise ValueError(f"a query image has {q.size} codes, the memory's images "
                             f"{self.codes_per_image}")
        return q.astype(self.codes.dtype)


def _flat_values(column: pa.ListArray) -> np.ndarray:
    """The codes of a batch's valid rows, concatenated in row order."""
    return column.flatten().to_numpy(zero_copy_only=False)
