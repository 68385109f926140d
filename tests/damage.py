"""Damage a published memory version on disk the way a bad disk or a stray write would,
for the tests that check it is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from retrieval.manifest import MANIFEST_NAME, file_entry, read_manifest


def overwrite_image_code(store_path: Path, row: int, value: int) -> None:
    """Write `value` over the first image code of `row`, in place: same size, so only a
    checksum (or a range check) can tell."""
    source = pa.memory_map(str(store_path), "r")
    base = source.read_buffer().address
    source.seek(0)
    reader = pa.ipc.open_file(source)
    batch_rows = int((reader.schema.metadata or {})[b"racm3.batch_rows"])
    codes = reader.get_batch(row // batch_rows).column(4)
    assert codes[row % batch_rows].is_valid, f"row {row} has no image codes"
    values = codes.values
    item = np.dtype(values.type.to_pandas_dtype())
    at = values.buffers()[1].address - base + (values.offset + codes.offsets[
        row % batch_rows].as_py()) * item.itemsize
    source.close()
    with store_path.open("r+b") as f:
        f.seek(at)
        f.write(np.asarray([value], item.newbyteorder("<")).tobytes())


def reseal(version_dir: Path) -> None:
    """Recompute the manifest's checksums, as a build that copied damage would have: the
    version's own checks then pass."""
    manifest = read_manifest(version_dir)
    manifest.files = {name: file_entry(version_dir / name) for name in manifest.files}
    (version_dir / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2))
