"""A memory version's manifest: what it holds, how it was built, and how to check it.

`manifest.json` is the last file written into a version directory, and `complete: true`
is its last key: a version without it is half-written and is never served. Each data
file is recorded with its size, its sha256 and the sha256 of its first and last MiB
("edge" checksum), so a loader can choose a full check or a fast one (see
`verify_file`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
INDEX_FILE = "index.faiss"
STORE_FILE = "store.arrow"
EMBEDDINGS_FILE = "embeddings.npy"
DATA_FILES = (INDEX_FILE, STORE_FILE, EMBEDDINGS_FILE)
# The CLIP image vector of each document's VQ-reconstructed image (what the t2i reranker
# compares candidates with), float32 (N, D), zero rows for documents without an image.
# Optional: a version built without it serves, and the reranker computes the vectors.
RERANK_FILE = "rerank_vectors.npy"
EDGE_BYTES = 1 << 20
_READ_CHUNK = 8 << 20


class ManifestError(ValueError):
    """A manifest or a file it describes is missing, unreadable, incomplete or wrong."""


@dataclass
class FileEntry:
    bytes: int
    sha256: str
    edge_sha256: str  # sha256 of the first and last EDGE_BYTES (the whole file if smaller)


@dataclass
class Manifest:
    version: str  # e.g. "v000003"
    components: dict[str, str]  # clip, vq, tokenizer, bundle (ids or hashes)
    counts: dict[str, Any]  # documents, added, with_image, with_text, skipped {reason: n}
    index: dict[str, Any]  # IndexInfo: type, factory, params, recall_at_10, mmap_mode…
    embedding_dim: int
    files: dict[str, FileEntry]
    image_grid: list[int] | None = None  # (h, w) of the VQ code grid
    parent: str | None = None  # the version this one was appended to
    lexical: dict[str, Any] | None = None  # the BM25 index over captions; None: built at load
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime()))
    format: int = MANIFEST_FORMAT
    complete: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["complete"] = d.pop("complete")  # last key, as the file is written last
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        missing = [f for f in ("version", "components", "counts", "index", "embedding_dim",
                               "files") if f not in d]
        if missing:
            raise ManifestError(f"manifest lacks {', '.join(missing)}")
        if d.get("format", MANIFEST_FORMAT) > MANIFEST_FORMAT:
            raise ManifestError(f"manifest format {d['format']} is newer than this code "
                                f"({MANIFEST_FORMAT}): upgrade racm3")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["files"] = {name: FileEntry(**e) for name, e in d["files"].items()}
        return cls(**known)


def file_entry(path: str | Path) -> FileEntry:
    """Size, sha256 and edge sha256 of a file, in one read."""
    path = Path(path)
    size = path.stat().st_size
    full = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_READ_CHUNK):
            full.update(block)
    return FileEntry(bytes=size, sha256=full.hexdigest(), edge_sha256=edge_sha256(path))


def edge_sha256(path: str | Path) -> str:
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            h.update(f.read(EDGE_BYTES))
    return h.hexdigest()


def verify_file(path: str | Path, entry: FileEntry, full: bool) -> None:
    """Raise ManifestError unless `path` matches `entry`.

    full=True hashes every byte. full=False ("fast") checks the size and the first and
    last MiB: it catches truncation, a file from another build and a torn write at
    either end, but not a flipped byte in the middle.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path} is missing")
    size = path.stat().st_size
    if size != entry.bytes:
        raise ManifestError(f"{path} has {size} bytes, the manifest says {entry.bytes} "
                            "(truncated or replaced)")
    if full:
        if file_entry(path).sha256 != entry.sha256:
            raise ManifestError(f"{path} is corrupt: its sha256 differs from the manifest")
    elif edge_sha256(path) != entry.edge_sha256:
        raise ManifestError(f"{path} is corrupt: the checksum of its first/last MiB differs "
                            "from the manifest")


def write_manifest(version_dir: str | Path, manifest: Manifest) -> Path:
    """Write manifest.json atomically (temp file, fsync, rename)."""
    path = Path(version_dir) / MANIFEST_NAME
    tmp = path.with_name(MANIFEST_NAME + ".tmp")
    with tmp.open("w") as f:
        json.dump(manifest.to_dict(), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(version_dir: str | Path) -> Manifest:
    """The manifest of a version directory; ManifestError if it cannot be served."""
    path = Path(version_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path} is missing: the version is half-written")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is unreadable: {e}") from e
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a JSON object")
    if data.get("complete") is not True:
        raise ManifestError(f"{path} is not marked complete: the build that wrote it did "
                            "not finish")
    try:
        return Manifest.from_dict(data)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from e
    except (TypeError, KeyError, AttributeError) as e:
        raise ManifestError(f"{path} is malformed: {e}") from e
