"""Versioned memories, published atomically.

    MEMORY/
      CURRENT                  the name of the version being served (one line)
      versions/v000001/        index.faiss  store.arrow  embeddings.npy  manifest.json
      versions/.tmp-…/         a build in progress, or one that was killed: never read

A build writes into a `.tmp-` staging directory (`new_staging_dir`), its manifest last.
`publish` fsyncs every file, renames the directory to its version name and only then
replaces CURRENT (temp file + fsync + os.replace + directory fsync). A build killed at
any point leaves CURRENT, and the version it names, untouched; its staging directory is
ignored by readers and removed by `clean_staging`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from retrieval.manifest import MANIFEST_NAME, ManifestError, read_manifest

CURRENT = "CURRENT"
VERSIONS = "versions"
STAGING_PREFIX = ".tmp-"
_VERSION_NAME = re.compile(r"v\d{6}")


class PublishError(RuntimeError):
    pass


def versions_dir(memory_dir: str | Path) -> Path:
    return Path(memory_dir) / VERSIONS


def version_dir(memory_dir: str | Path, version: str) -> Path:
    if not _VERSION_NAME.fullmatch(version):
        raise ValueError(f"{version!r} is not a version name (v000001, v000002, …)")
    return versions_dir(memory_dir) / version


def current_version(memory_dir: str | Path) -> str | None:
    """The version CURRENT points at, or None for a memory never published."""
    path = Path(memory_dir) / CURRENT
    if not path.is_file():
        return None
    raw = path.read_bytes()
    name = raw.decode("ascii", errors="replace").strip()
    if not _VERSION_NAME.fullmatch(name):
        shown = name if len(name) <= 40 else name[:40] + "…"
        raise PublishError(f"{path} holds {shown!r}, not a version name")
    return name


def list_versions(memory_dir: str | Path) -> list[str]:
    """Published version names, oldest first (staging directories are not versions)."""
    root = versions_dir(memory_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if _VERSION_NAME.fullmatch(p.name))


def next_version_name(memory_dir: str | Path) -> str:
    last = max((int(v[1:]) for v in list_versions(memory_dir)), default=0)
    return f"v{last + 1:06d}"


def new_staging_dir(memory_dir: str | Path) -> Path:
    """A fresh, private `versions/.tmp-XXXX` directory for a build to write into."""
    root = versions_dir(memory_dir)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))


def clean_staging(memory_dir: str | Path, older_than_s: float = 3600.0) -> list[Path]:
    """Remove staging directories left by killed builds. Only those untouched for
    `older_than_s` go, so a build running beside this one keeps its directory."""
    root = versions_dir(memory_dir)
    removed = []
    for path in root.glob(STAGING_PREFIX + "*") if root.is_dir() else ():
        if time.time() - path.stat().st_mtime >= older_than_s:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(memory_dir: str | Path, staged_dir: str | Path) -> str:
    """Seal a staged version (its manifest must be complete), rename it into place under
    the version name its manifest records, and switch CURRENT to it."""
    memory_dir, staged = Path(memory_dir), Path(staged_dir)
    try:
        manifest = read_manifest(staged)
    except ManifestError as e:
        raise PublishError(f"cannot publish {staged}: {e}") from e
    for name in [*manifest.files, MANIFEST_NAME]:
        fsync_path(staged / name)
    fsync_path(staged)
    final = version_dir(memory_dir, manifest.version)
    if final.exists():
        raise PublishError(f"{final} already exists: another build published "
                           f"{manifest.version} first; rebuild")
    os.rename(staged, final)
    fsync_path(final.parent)
    set_current(memory_dir, manifest.version)
    return manifest.version


def set_current(memory_dir: str | Path, version: str) -> None:
    """Point CURRENT at a published version, atomically (also how to roll back)."""
    memory_dir = Path(memory_dir)
    vdir = version_dir(memory_dir, version)
    if not (vdir / MANIFEST_NAME).is_file():
        raise PublishError(f"{vdir} is not a published version")
    fd, tmp = tempfile.mkstemp(prefix=CURRENT + ".", dir=memory_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, memory_dir / CURRENT)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(memory_dir)
