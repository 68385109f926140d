"""The document store (one Arrow IPC file) and the embeddings file, both memory-mapped.

Store rows are written in record batches of a fixed size, so document id -> (batch, row)
is arithmetic, and a lookup touches only the pages of the rows it reads: a retriever
over a million documents keeps in RAM only what it reads, and replicas share the page
cache. Ids are dense, 0..n-1 in file order.

Row: id, caption, image (PNG bytes), text_ids (raw BPE ids), image_codes (raw VQ codes,
flattened raster order), source. Ids are the tokenizers' own: the consumer maps them into
the CM3 token space (`TokenSpace.text_to_ids` / `codes_to_ids`), so the store does not
depend on how that space is laid out.

Embeddings are a float32 (N, D) `.npy` file, written row chunk by row chunk with its
header patched at the end (the count is unknown while a source streams), and read with
`np.load(mmap_mode="r")`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

BATCH_ROWS = 1024  # rows per record batch: the unit of random access
STORE_FORMAT = "1"
CODE_TYPES = {"int16": pa.int16(), "int32": pa.int32()}
_META_BATCH_ROWS = b"racm3.batch_rows"
_META_FORMAT = b"racm3.store_format"


def store_schema(code_type: str = "int16") -> pa.Schema:
    return pa.schema([
        ("id", pa.int64()),
        ("caption", pa.string()),
        ("image", pa.binary()),
        ("text_ids", pa.list_(pa.int32())),
        ("image_codes", pa.list_(CODE_TYPES[code_type])),
        ("source", pa.string()),
    ])


class StoreError(ValueError):
    """A stored row is not what a valid store holds: the file is damaged."""


@dataclass(frozen=True)
class RowBounds:
    """What a valid row may hold, given the models that will read it (None: unchecked)."""

    codebook_size: int | None = None  # image codes in [0, codebook_size)
    codes_per_image: int | None = None  # h * w of the VQ grid
    text_vocab_size: int | None = None  # BPE ids in [0, text_vocab_size)


def check_batch(batch: pa.RecordBatch, first_id: int, bounds: RowBounds,
                code_max: int | None = None) -> None:
    """Raise StoreError naming the first bad row of `batch`, which should hold ids
    `first_id`, `first_id + 1`, ...: ids out of order, image codes or text ids outside
    their models' ranges, or a code grid of the wrong size. Vectorised: one pass over
    each column's values, so checking a million rows costs about as much as reading them."""
    ids = batch.column(0).to_numpy(zero_copy_only=False)
    misplaced = np.flatnonzero(ids != np.arange(first_id, first_id + batch.num_rows))
    if misplaced.size:
        row = int(misplaced[0])
        raise StoreError(f"row {first_id + row} holds id {ids[row]}")
    hi = bounds.codebook_size if bounds.codebook_size is not None else (
        None if code_max is None else code_max + 1)
    _check_values(batch.column(4), first_id, "image code", hi)
    _check_values(batch.column(3), first_id, "text id", bounds.text_vocab_size)
    if bounds.codes_per_image is not None:
        lengths = pc.fill_null(pc.list_value_length(batch.column(4)), bounds.codes_per_image)
        lengths = lengths.to_numpy(zero_copy_only=False)
        wrong = np.flatnonzero(lengths != bounds.codes_per_image)
        if wrong.size:
            row = int(wrong[0])
            raise StoreError(f"row {first_id + row} has {int(lengths[row])} image codes, "
                             f"the VQ grid has {bounds.codes_per_image}")


def _check_values(column: pa.ListArray, first_id: int, what: str, hi: int | None) -> None:
    values = column.flatten().to_numpy(zero_copy_only=False)
    if not values.size:
        return
    bad = values < 0 if hi is None else (values < 0) | (values >= hi)
    if bad.any():
        at = int(np.flatnonzero(bad)[0])
        row = int(pc.list_parent_indices(column).to_numpy(zero_copy_only=False)[at])
        where = "[0, …)" if hi is None else f"[0, {hi})"
        raise StoreError(f"row {first_id + row}: {what} {int(values[at])} outside {where}")


@dataclass
class StoredDoc:
    id: int
    caption: str | None
    text_ids: list[int] | None  # raw BPE ids
    image_codes: np.ndarray | None  # raw VQ codes, flat, raster order (int64)
    source: str
    has_image: bool
    image_bytes: bytes | None = None  # PNG; only filled when asked for (`with_image`)

    @property
    def has_text(self) -> bool:
        return bool(self.caption) or bool(self.text_ids)


class StoreWriter:
    """Streams rows into an Arrow IPC file in fixed-size record batches.

    A row is a mapping with `caption`, `image` (PNG bytes), `text_ids`, `image_codes`
    (any int array; flattened) and `source`; every key may be missing or None except
    `source`. The writer assigns ids: 0, 1, 2… in append order.
    """

    def __init__(self, path: str | Path, *, code_type: str = "int16",
                 batch_rows: int = BATCH_ROWS) -> None:
        if code_type not in CODE_TYPES:
            raise ValueError(f"code_type must be one of {sorted(CODE_TYPES)}")
        self.path = Path(path)
        self.batch_rows = batch_rows
        self.schema = store_schema(code_type).with_metadata(
            {_META_BATCH_ROWS: str(batch_rows).encode(), _META_FORMAT: STORE_FORMAT.encode()})
        self.code_type = code_type
        self._code_max = np.iinfo(np.int16 if code_type == "int16" else np.int32).max
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._pending: list[dict[str, Any]] = []
        self.count = 0

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, rows: Iterable[Mapping[str, Any]]) -> list[int]:
        ids = []
        for row in rows:
            self._pending.append(self._normalise(row))
            ids.append(self.count)
            self.count += 1
            if len(self._pending) == self.batch_rows:
                self._flush()
        return ids

    def copy_from(self, store: DocumentStore, bounds: RowBounds | None = None) -> None:
        """Append every row of `store` with its ids unchanged (the writer must be empty).

        Every batch is checked first (`check_batch`), so a damaged store raises
        StoreError naming the row instead of being copied into a new version whose own
        checksums would then vouch for it. Full record batches are then written as they
        are, without decoding their rows."""
        if self.count:
            raise ValueError("copy_from keeps ids, so it must come before any append")
        for batch in store.batches():
            check_batch(batch, self.count, bounds or RowBounds(), self._code_max)
            if batch.num_rows == self.batch_rows and not self._pending:
                self._writer.write_batch(_cast(batch, self.schema))
                self.count += batch.num_rows
            else:  # the last, partial batch: its rows start the next full one
                self.append(batch.to_pylist())

    def _normalise(self, row: Mapping[str, Any]) -> dict[str, Any]:
        codes = row.get("image_codes")
        if codes is not None:
            codes = np.asarray(codes).reshape(-1)
            if codes.size and codes.min() < 0:
                raise ValueError(f"negative image code {int(codes.min())}")
            if codes.size and codes.max() > self._code_max:
                raise ValueError(f"image code {int(codes.max())} does not fit the store's "
                                 f"{self.code_type} codes: a codebook this large needs "
                                 "code_type='int32'")
            codes = codes.tolist()
        text_ids = row.get("text_ids")
        return {
            "id": self.count,
            "caption": row.get("caption") or None,
            "image": row.get("image"),
            "text_ids": None if text_ids is None else [int(t) for t in text_ids],
            "image_codes": codes,
            "source": str(row.get("source", "")),
        }

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_batch(pa.RecordBatch.from_pylist(self._pending, self.schema))
            self._pending = []

    def close(self) -> None:
        if self._sink.closed:
            return
        self._flush()
        self._writer.close()
        self._sink.close()


def _cast(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    if batch.schema.equals(schema, check_metadata=False):
        return batch
    return pa.RecordBatch.from_arrays(
        [col.cast(f.type) for col, f in zip(batch.columns, schema, strict=True)], schema=schema)


class DocumentStore:
    """Random access by id over a memory-mapped store file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._source = pa.memory_map(str(self.path), "r")
        try:
            self._reader = pa.ipc.open_file(self._source)
        except Exception:
            self._source.close()
            raise
        meta = self._reader.schema.metadata or {}
        self.batch_rows = int(meta.get(_META_BATCH_ROWS, BATCH_ROWS))
        nb = self._reader.num_record_batches
        self._len = (nb - 1) * self.batch_rows + self._reader.get_batch(nb - 1).num_rows \
            if nb else 0

    @classmethod
    def open(cls, path: str | Path) -> DocumentStore:
        return cls(path)

    def __len__(self) -> int:
        return self._len

    def batches(self) -> Iterator[pa.RecordBatch]:
        for i in range(self._reader.num_record_batches):
            yield self._reader.get_batch(i)

    def get(self, ids: Sequence[int], *, with_image: bool = False) -> list[StoredDoc]:
        """Documents in the order of `ids` (repeats allowed); PNG bytes if `with_image`."""
        out: list[StoredDoc | None] = [None] * len(ids)
        by_batch: dict[int, list[int]] = {}
        for pos, i in enumerate(ids):
            i = int(i)
            if not 0 <= i < self._len:
                raise IndexError(f"document id {i} outside the store (0..{self._len - 1})")
            by_batch.setdefault(i // self.batch_rows, []).append(pos)
        for b, positions in by_batch.items():
            batch = self._reader.get_batch(b)
            for pos in positions:
                out[pos] = self._row(batch, int(ids[pos]), with_image)
        return out  # type: ignore[return-value]

    def _row(self, batch: pa.RecordBatch, i: int, with_image: bool) -> StoredDoc:
        r = i % self.batch_rows
        found = batch.column(0)[r].as_py()
        if found != i:  # batches are fixed-size; anything else is a damaged file
            raise ValueError(f"{self.path}: row for id {i} holds id {found}")
        image, codes, text = batch.column(2)[r], batch.column(4)[r], batch.column(3)[r]
        return StoredDoc(
            id=i,
            caption=batch.column(1)[r].as_py(),
            text_ids=text.values.to_numpy(zero_copy_only=False).tolist() if text.is_valid
            else None,
            image_codes=codes.values.to_numpy(zero_copy_only=False).astype(np.int64)
            if codes.is_valid else None,
            source=batch.column(5)[r].as_py(),
            has_image=image.is_valid or codes.is_valid,
            image_bytes=image.as_py() if with_image else None,
        )

    def image_bytes(self, i: int) -> bytes | None:
        return self.get([i], with_image=True)[0].image_bytes

    def modality_flags(self) -> tuple[np.ndarray, np.ndarray]:
        """(has_image, has_text) bool arrays over all ids, from the validity bitmaps only."""
        has_image, has_text = [], []
        for batch in self.batches():
            image = batch.column(2).is_valid().to_numpy(zero_copy_only=False)
            codes = batch.column(4).is_valid().to_numpy(zero_copy_only=False)
            has_image.append(image | codes)
            has_text.append(batch.column(1).is_valid().to_numpy(zero_copy_only=False))
        if not has_image:
            return np.zeros(0, bool), np.zeros(0, bool)
        return np.concatenate(has_image), np.concatenate(has_text)

    def close(self) -> None:
        self._source.close()


# --- embeddings ------------------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_NPY_HEADER_BYTES = 128  # room for any (n, d) shape; a multiple of 64 keeps rows aligned


def _npy_header(n: int, dim: int) -> bytes:
    text = repr({"descr": "<f4", "fortran_order": False, "shape": (n, dim)})
    body_len = _NPY_HEADER_BYTES - len(_NPY_MAGIC) - 2
    body = text.ljust(body_len - 1) + "\n"
    return _NPY_MAGIC + struct.pack("<H", body_len) + body.encode("latin1")


class EmbeddingsWriter:
    """Appends float32 rows to an `.npy` file without knowing the final count."""

    def __init__(self, path: str | Path, dim: int) -> None:
        self.path = Path(path)
        self.dim = int(dim)
        self.count = 0
        self._file: BinaryIO = self.path.open("wb")
        self._file.write(_npy_header(0, self.dim))

    def __enter__(self) -> EmbeddingsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, vectors: np.ndarray) -> None:
        v = np.ascontiguousarray(vectors, dtype="<f4")
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (N, {self.dim}), got {v.shape}")
        self._file.write(v.tobytes())
        self.count += len(v)

    def copy_from(self, vectors: np.ndarray, chunk_rows: int = 65_536) -> None:
        """Append `vectors` in chunks; a non-finite value (a damaged file) raises
        StoreError naming its row."""
        for start in range(0, len(vectors), chunk_rows):
            chunk = np.asarray(vectors[start : start + chunk_rows])
            finite = np.isfinite(chunk).all(axis=1)
            if not finite.all():
                row = start + int(np.flatnonzero(~finite)[0])
                raise StoreError(f"embedding row {row} is not finite")
            self.append(chunk)

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.seek(0)
        self._file.write(_npy_header(self.count, self.dim))
        self._file.close()


def open_embeddings(path: str | Path) -> np.ndarray:
    """The (N, D) float32 embeddings, memory-mapped read-only."""
    vectors = np.load(path, mmap_mode="r")
    if vectors.dtype != np.float32 or vectors.ndim != 2:
        raise ValueError(f"{path}: expected float32 (N, D), got {vectors.dtype} {vectors.shape}")
    return vectors
