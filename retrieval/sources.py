"""Streaming readers that turn a dataset on disk into memory documents (`SourceItem`s).

Every reader is a generator: it holds one row / one file / one tar member group at a
time, never the dataset. A bad item (unreadable image, missing file, broken row) is
skipped and counted in a `SkipReport`; it never aborts the build.

Kinds (see `SOURCES`):
- `folder`: images with sidecar `.txt` captions of the same stem, recursively;
- `jsonl`, `csv`, `parquet`: rows with a local image path (relative to the file's
  directory, or absolute) and/or a caption; Parquet may also carry image bytes;
- `webdataset`: img2dataset `.tar` shards (`key.jpg` + `key.txt` + `key.json`).
The demo world registers itself here with `register_source("world", ...)`.

No URL is ever fetched: a row that points at `http://...` is skipped with the reason
"remote urls are not fetched".
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from retrieval.images import DEFAULT_MAX_PIXELS, ImageError, encode_png, load_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
DEFAULT_IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filepath", "filename", "url")
DEFAULT_CAPTION_COLUMNS = ("caption", "text", "alt", "title")
REMOTE_URL = "remote urls are not fetched"
# A tar member is read into memory whole; bigger than this is not a caption-dataset image.
MAX_MEMBER_BYTES = 64 * 1024 * 1024


@dataclass
class SourceItem:
    """One memory document as read from a source, image already normalised."""

    image: np.ndarray | None  # uint8 (size, size, 3) RGB
    image_bytes: bytes | None  # PNG of `image`, for the document store
    caption: str | None
    source: str  # where it came from: a path, "shard.tar:key", "file.jsonl:12"
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SkipReport:
    """What a build skipped (and what it noticed without skipping), with a few examples."""

    max_examples: int = 5
    items: int = 0  # documents produced
    skipped: Counter[str] = field(default_factory=Counter)
    noted: Counter[str] = field(default_factory=Counter)  # kept, but worth saying (empty_caption)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, source: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self._example(reason, source, detail)
        logger.debug("skipped %s (%s) %s", source, reason, detail)

    def note(self, reason: str, source: str) -> None:
        self.noted[reason] += 1
        self._example(reason, source, "")

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "skipped": dict(self.skipped),
            "noted": dict(self.noted),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }

    def summary(self) -> str:
        parts = [f"{self.items} documents", f"{self.total_skipped} skipped"]
        parts += [f"{reason}: {n}" for reason, n in self.skipped.most_common()]
        parts += [f"{reason}: {n} (kept)" for reason, n in self.noted.most_common()]
        return ", ".join(parts)

    def _example(self, reason: str, source: str, detail: str) -> None:
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(f"{source}: {detail}" if detail else source)


# A reader: (input, size, report, **options) -> documents.
SourceReader = Callable[..., Iterator[SourceItem]]
SOURCES: dict[str, SourceReader] = {}


def register_source(kind: str, reader: SourceReader) -> None:
    """Add a source kind (the demo world registers "world" from its own module)."""
    SOURCES[kind] = reader


def open_source(
    kind: str, input: str | os.PathLike, size: int, report: SkipReport, **opts: Any
) -> Iterator[SourceItem]:
    """Stream the documents of `input` read as `kind` at `size`x`size` pixels."""
    if kind not in SOURCES:
        raise ValueError(f"unknown source kind {kind!r}; known: {sorted(SOURCES)}")
    return SOURCES[kind](input, size, report, **opts)


def guess_source_kind(input: str | os.PathLike) -> str:
    """The source kind a path most likely is: a directory, or by file extension."""
    text = str(input)
    if os.path.isdir(text):
        return "folder"
    suffixes = "".join(Path(text).suffixes[-2:]).lower()
    for kind, endings in (
        ("jsonl", (".jsonl", ".jsonl.gz", ".ndjson")),
        ("csv", (".csv", ".tsv", ".csv.gz", ".tsv.gz")),
        ("parquet", (".parquet",)),
        ("webdataset", (".tar",)),
    ):
        if suffixes.endswith(endings):
            return kind
    raise ValueError(f"cannot tell the source kind of {text}; name it explicitly")


# --- building one item ---------------------------------------------------------------------


def make_item(
    image: np.ndarray | None,
    caption: str | None,
    source: str,
    report: SkipReport,
    meta: dict[str, Any] | None = None,
) -> SourceItem | None:
    """A document from an already-normalised image and/or caption (None if it has neither).

    For sources that render their own images, such as the demo world.
    """
    text = None if caption is None else str(caption).strip()
    if image is None and not text:
        report.skip("empty", source, "no image and no caption")
        return None
    if text == "":
        report.note("empty_caption", source)
    image_bytes = encode_png(image) if image is not None else None
    report.items += 1
    return SourceItem(image, image_bytes, text or None, source, meta or {})


def _item_from_ref(
    image_ref: Any,
    caption: Any,
    source: str,
    base_dir: Path,
    size: int,
    report: SkipReport,
    meta: dict[str, Any],
    max_pixels: int,
) -> SourceItem | None:
    """Resolve an image reference (path, bytes, or {bytes, path}), decode, build."""
    image = None
    if _is_present(image_ref):
        try:
            image = _decode_ref(image_ref, base_dir, size, max_pixels)
        except _Skip as skip:
            report.skip(skip.reason, source, skip.detail)
            return None
    return make_item(image, caption, source, report, meta)


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _is_present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, bytes | bytearray):
        return len(value) > 0
    if isinstance(value, dict):
        return _is_present(value.get("bytes")) or _is_present(value.get("path"))
    return True


def _decode_ref(ref: Any, base_dir: Path, size: int, max_pixels: int) -> np.ndarray:
    if isinstance(ref, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
        ref = ref.get("bytes") if _is_present(ref.get("bytes")) else ref.get("path")
    if isinstance(ref, bytes | bytearray):
        data: bytes | Path = bytes(ref)
    elif isinstance(ref, Path):
        data = ref
    elif isinstance(ref, str):
        data = _local_path(ref.strip(), base_dir)
    else:
        raise _Skip("bad_image_reference", f"unsupported image value {type(ref).__name__}")
    try:
        return load_image(data, size, max_pixels=max_pixels)
    except ImageError as err:
        raise _Skip(err.reason, str(err)) from err
    except FileNotFoundError as err:
        raise _Skip("missing_file", str(data)) from err
    except OSError as err:  # a directory, a permission problem...
        raise _Skip("unreadable_file", f"{data} ({err})") from err


def _local_path(ref: str, base_dir: Path) -> Path:
    if ref.startswith("file://"):
        return Path(ref[len("file://") :])
    if "://" in ref or ref.startswith("data:"):
        raise _Skip(REMOTE_URL, ref[:200])
    path = Path(ref).expanduser()
    return path if path.is_absolute() else base_dir / path


def _pick_column(names: Iterable[str], wanted: str | None, defaults: tuple[str, ...]) -> str | None:
    """The explicitly wanted column, else the first default present (case-insensitive)."""
    by_lower = {n.lower(): n for n in names}
    if wanted is not None:
        return wanted
    for candidate in defaults:
        if candidate in by_lower:
            return by_lower[candidate]
    return None


# --- folder ----------------------------------------------------------------------------------


def read_folder(
    path: str | os.PathLike,
    size: int,
    report: SkipReport,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[SourceItem]:
    """Images under `path` (recursively, in sorted order) with optional `<stem>.txt`."""
    root = Path(path)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = set(filenames)
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if name.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS:
                continue
            image_path = Path(dirpath) / name
            source = str(image_path.relative_to(root))
            caption = None
            if stem + ".txt" in names:
                try:
                    caption = (Path(dirpath) / (stem + ".txt")).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as err:
                    report.skip("unreadable_caption", source, str(err))
                    continue
            item = _item_from_ref(image_path, caption, source, root, size, report, {}, max_pixels)
            if item is not None:
                yield item


# --- row files: JSONL, CSV, Parquet ----------------------------------------------------------


def read_jsonl(
    path: str | os.PathLike,
    size: int,
    report: SkipReport,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[SourceItem]:
    """One JSON object per line; `.gz` is read transparently.

    Lines are decoded one by one, so a line with invalid UTF-8 costs only that row.
    """
    path = Path(path)
    yield from _items_from_rows(_jsonl_rows(path, report), path, image_column, caption_column,
                                size, report, max_pixels)


def _jsonl_rows(path: Path, report: SkipReport) -> Iterator[tuple[str, dict[str, Any]]]:
    """(source, row) per JSON object line; a line that is not one is skipped and counted."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as lines:
        for line_no, raw in enumerate(lines, start=1):
            source = f"{path.name}:{line_no}"
            try:
                line = raw.decode("utf-8").lstrip("\ufeff")
            except UnicodeDecodeError as err:
                report.skip("bad_row", source, f"invalid UTF-8 ({err})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                report.skip("bad_row", source, f"invalid JSON ({err})")
                continue
            if not isinstance(row, dict):
                report.skip("bad_row", source, "not a JSON object")
                continue
            yield source, row


def read_csv(
    path: str | os.PathLike,
    size: int,
    report: SkipReport,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    delimiter: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[SourceItem]:
    """CSV (or TSV, by extension or `delimiter`) with a header row.

    A quoted field may span lines, so the file is decoded as a whole; invalid UTF-8 is
    replaced (U+FFFD) rather than ending the read.
    """
    path = Path(path)
    if delimiter is None:
        delimiter = "\t" if ".tsv" in path.suffixes else ","
    yield from _items_from_rows(_csv_rows(path, delimiter, report), path, image_column,
                                caption_column, size, report, max_pixels)


def _csv_rows(path: Path, delimiter: str, report: SkipReport,
              ) -> Iterator[tuple[str, dict[str, Any]]]:
    """(source, row) per CSV record; a record that does not parse is skipped and counted."""
    with _open_text(path) as text:
        reader = csv.DictReader(text, delimiter=delimiter)
        row_no = 0
        while True:
            row_no += 1
            source = f"{path.name}:{row_no}"
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:  # e.g. a field over csv.field_size_limit()
                report.skip("bad_row", source, str(err))
                continue
            if None in row:  # more fields than the header
                report.skip("bad_row", source, "more fields than the header")
                continue
            yield source, row


def _items_from_rows(rows: Iterator[tuple[str, dict[str, Any]]], path: Path,
                     image_column: str | None, caption_column: str | None, size: int,
                     report: SkipReport, max_pixels: int) -> Iterator[SourceItem]:
    for source, row in rows:
        item = _item_from_row(
            row, image_column, caption_column, source, path.parent, size, report, max_pixels
        )
        if item is not None:
            yield item


def read_parquet(
    path: str | os.PathLike,
    size: int,
    report: SkipReport,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    batch_rows: int = 1024,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[SourceItem]:
    """Parquet read in row batches; the image column may hold paths or encoded bytes."""
    import pyarrow.parquet as pq  # only this reader needs pyarrow

    path = Path(path)
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    image_col = _pick_column(names, image_column, DEFAULT_IMAGE_COLUMNS)
    caption_col = _pick_column(names, caption_column, DEFAULT_CAPTION_COLUMNS)
    _require_columns(path, names, image_col, caption_col)
    columns = [c for c in (image_col, caption_col) if c is not None]
    row_no = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
        for row in batch.to_pylist():
            row_no += 1
            source = f"{path.name}:{row_no}"
            item = _item_from_ref(
                row.get(image_col) if image_col else None,
                row.get(caption_col) if caption_col else None,
                source, path.parent, size, report, {}, max_pixels,
            )
            if item is not None:
                yield item


def _item_from_row(
    row: dict[str, Any],
    image_column: str | None,
    caption_column: str | None,
    source: str,
    base_dir: Path,
    size: int,
    report: SkipReport,
    max_pixels: int,
) -> SourceItem | None:
    image_col = _pick_column(row.keys(), image_column, DEFAULT_IMAGE_COLUMNS)
    caption_col = _pick_column(row.keys(), caption_column, DEFAULT_CAPTION_COLUMNS)
    if image_col is None and caption_col is None:
        report.skip("bad_row", source, f"no image or caption column among {sorted(row)[:10]}")
        return None
    meta = {k: v for k, v in row.items() if k not in (image_col, caption_col)}
    return _item_from_ref(
        row.get(image_col) if image_col else None,
        row.get(caption_col) if caption_col else None,
        source, base_dir, size, report, meta, max_pixels,
    )


def _require_columns(path: Path, names: list[str], image_col: str | None, caption_col: str | None):
    for col in (image_col, caption_col):
        if col is not None and col not in names:
            raise ValueError(f"{path}: no column {col!r}; columns are {names}")
    if image_col is None and caption_col is None:
        raise ValueError(f"{path}: no image or caption column among {names}")


def _open_text(path: Path) -> IO[str]:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace", newline="")
    return open(path, encoding="utf-8-sig", errors="replace", newline="")


# --- webdataset ------------------------------------------------------------------------------


def read_webdataset(
    path: str | os.PathLike,
    size: int,
    report: SkipReport,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[SourceItem]:
    """img2dataset shards: a `.tar`, a glob of them, or a directory holding them.

    Members are grouped by key (the name up to the first dot of the basename), which
    webdataset writes consecutively, so one sample is in memory at a time.
    """
    for shard in _shard_paths(path):
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                yield from _read_shard(tar, shard, size, report, max_pixels)
        except (tarfile.TarError, OSError, EOFError) as err:
            report.skip("corrupt_shard", str(shard), str(err))


def _shard_paths(path: str | os.PathLike) -> list[Path]:
    text = str(path)
    if os.path.isdir(text):
        shards = sorted(Path(text).glob("*.tar"))
    elif glob.has_magic(text):
        shards = sorted(Path(p) for p in glob.glob(text))
    else:
        shards = [Path(text)]
    if not shards:
        raise FileNotFoundError(f"no .tar shards at {text}")
    return shards


def _read_shard(
    tar: tarfile.TarFile, shard: Path, size: int, report: SkipReport, max_pixels: int
) -> Iterator[SourceItem]:
    key: str | None = None
    parts: dict[str, bytes] = {}
    for member in tar:
        if not member.isfile():
            continue
        dirname, basename = os.path.split(member.name)
        if basename.startswith("."):
            continue
        member_key, _, ext = basename.partition(".")
        member_key = f"{dirname}/{member_key}" if dirname else member_key
        if member_key != key:
            if key is not None:
                item = _item_from_sample(key, parts, shard, size, report, max_pixels)
                if item is not None:
                    yield item
            key, parts = member_key, {}
        if member.size > MAX_MEMBER_BYTES:
            parts[ext.lower()] = b""
            report.skip("too_large", f"{shard.name}:{member.name}", f"{member.size} bytes")
            continue
        extracted = tar.extractfile(member)
        if extracted is not None:
            parts[ext.lower()] = extracted.read()
    if key is not None:
        item = _item_from_sample(key, parts, shard, size, report, max_pixels)
        if item is not None:
            yield item


def _item_from_sample(
    key: str,
    parts: dict[str, bytes],
    shard: Path,
    size: int,
    report: SkipReport,
    max_pixels: int,
) -> SourceItem | None:
    source = f"{shard.name}:{key}"
    meta: dict[str, Any] = {}
    if "json" in parts:
        try:
            loaded = json.loads(parts["json"])
            meta = loaded if isinstance(loaded, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.debug("%s: ignoring unreadable json metadata", source)
    caption: str | None = None
    if "txt" in parts:
        try:
            caption = parts["txt"].decode("utf-8")
        except UnicodeDecodeError as err:
            report.skip("unreadable_caption", source, str(err))
            return None
    elif isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    image_ext = next((e for e in parts if "." + e in IMAGE_EXTENSIONS), None)
    if image_ext is not None and not parts[image_ext]:
        return None  # refused while reading (counted there)
    image_ref = parts[image_ext] if image_ext is not None else None
    return _item_from_ref(
        image_ref, caption, source, shard.parent, size, report, meta, max_pixels
    )


for _kind, _reader in (
    ("folder", read_folder),
    ("jsonl", read_jsonl),
    ("csv", read_csv),
    ("parquet", read_parquet),
    ("webdataset", read_webdataset),
):
    register_source(_kind, _reader)
