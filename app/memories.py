"""Several named memories, and which API key may use which.

- `RACM3_MEMORIES="public=memories/public,team-a=memories/team-a"` names the memories a
  retriever serves; the first is the default. Without it, `RACM3_MEMORY_DIR` is one
  memory named `default`. Each memory is a directory as `racm3 build-index --out` writes
  it, with its own versions, `CURRENT` and reload.
- `RACM3_API_KEYS="k1:public+team-a,k2:public"` limits keys to memories; a key without a
  list may use every memory.

Isolation: a memory a key may not use is answered exactly as a memory that does not
exist (`MemoryNotFound`, the same 404 body, decided by the same set look-ups before any
I/O), and a key's default is the first configured memory it may use. Nothing a key can
see (errors, /v1/info) names a memory it may not use; /metrics and /readyz are the
operator's and name none either in /readyz.

`MemorySet` holds the loaded memories of a retriever. Two names on the same directory
share one `Retriever` (one set of memory maps); distinct memories share the process's
query encoders, search batcher and neighbour cache, whose keys carry the memory's name.
A memory other than the default that fails to load is reported unavailable (503 for its
searches) while the others serve; reloading it retries.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ApiError, DependencyUnavailable

log = logging.getLogger(__name__)

DEFAULT_MEMORY = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class MemoryNotFound(ApiError):
    status_code = 404
    error_type = "not_found_error"
    default_code = "memory_not_found"

    def __init__(self, name: str, param: str) -> None:
        # Only what the client sent: the same words whether it is missing or forbidden.
        super().__init__(f"memory {name!r} not found", param=param)


# --- configuration -------------------------------------------------------------------------


def parse_memories(value: str | None, memory_dir: Path) -> list[tuple[str, Path]]:
    """`name=path,name=path` -> [(name, path)], in order; None or empty: one memory,
    `default`, at `memory_dir`. Raises ValueError with the offending entry."""
    if value is None or not value.strip():
        return [(DEFAULT_MEMORY, Path(memory_dir))]
    out: list[tuple[str, Path]] = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        name, sep, path = (part.strip() for part in entry.partition("="))
        if not sep or not path:
            raise ValueError(f"RACM3_MEMORIES entry {entry!r} is not name=path")
        if not _NAME.match(name):
            raise ValueError(f"memory name {name!r}: use letters, digits, '_', '.', '-' "
                             "(at most 64, starting with a letter or digit)")
        if name in (n for n, _ in out):
            raise ValueError(f"memory {name!r} is named twice in RACM3_MEMORIES")
        out.append((name, Path(path)))
    if not out:
        raise ValueError("RACM3_MEMORIES names no memory")
    return out


@dataclass(frozen=True)
class ApiKey:
    key: str
    memories: frozenset[str] | None  # None: every memory


def parse_api_key(entry: str) -> ApiKey:
    """`key` or `key:mem1+mem2`. Keys therefore cannot contain ':'."""
    key, sep, names = entry.strip().partition(":")
    if not sep:
        return ApiKey(key, None)
    allowed = frozenset(n.strip() for n in names.split("+") if n.strip())
    for name in allowed:
        if not _NAME.match(name):
            raise ValueError(f"API key entry lists an invalid memory name {name!r}")
    return ApiKey(key, allowed)


def bare_key(entry: str) -> str:
    """The key itself, as a client sends it (without its memory list)."""
    return parse_api_key(entry).key


class MemoryAccess:
    """Which memory a request may use; answers from configuration alone, without I/O."""

    def __init__(self, names: Sequence[str]) -> None:
        if not names:
            raise ValueError("at least one memory")
        self.names = list(names)
        self._known = frozenset(names)

    @property
    def default(self) -> str:
        return self.names[0]

    def visible(self, allowed: frozenset[str] | None) -> list[str]:
        """The memories a key (its `allowed` set; None = all) may use, in configured order."""
        return [n for n in self.names if allowed is None or n in allowed]

    def resolve(self, requested: str | None, allowed: frozenset[str] | None,
                param: str) -> str:
        """The memory to use: `requested`, else the key's first. Unknown and forbidden
        names raise the same `MemoryNotFound`."""
        if requested is None:
            mine = self.visible(allowed)
            if not mine:
                raise MemoryNotFound(self.default, param)
            return mine[0]
        if requested not in self._known or (allowed is not None and requested not in allowed):
            raise MemoryNotFound(requested, param)
        return requested


# --- the loaded memories of a retriever ------------------------------------------------


class MemorySet:
    """Named `Retriever`s (retrieval/memory.py), each with its current snapshot."""

    def __init__(self, specs: Iterable[tuple[str, Path]], verify: str,
                 snapshot_of: Callable[[Any], Any]) -> None:
        from retrieval.memory import MemoryLoadError, Retriever

        self.snapshot_of = snapshot_of
        self.verify = verify
        self.names: list[str] = []
        self.paths: dict[str, Path] = {}
        self._retrievers: dict[str, Retriever] = {}
        self._snapshots: dict[str, Any] = {}
        self._failed: dict[str, str] = {}
        self._lock = threading.Lock()
        by_path: dict[Path, Retriever] = {}
        for name, path in specs:
            self.names.append(name)
            self.paths[name] = Path(path)
            resolved = Path(path).resolve()
            try:
                retriever = by_path.get(resolved) or Retriever(path, verify=verify)
            except MemoryLoadError as exc:
                if name == self.names[0]:  # the default memory must load
                    raise
                log.error("memory %s is unavailable: %s", name, exc)
                self._failed[name] = str(exc)
                continue
            by_path[resolved] = retriever
            self._retrievers[name] = retriever
            self._snapshots[name] = snapshot_of(retriever.memory)

    @property
    def default(self) -> str:
        return self.names[0]

    def _name(self, name: str | None) -> str:
        name = self.default if name is None else name
        if name not in self.paths:
            raise MemoryNotFound(name, "memory")
        return name

    def current(self, name: str | None = None) -> Any:
        name = self._name(name)
        snapshot = self._snapshots.get(name)
        if snapshot is None:
            raise DependencyUnavailable(f"memory {name!r} is unavailable",
                                        code="memory_unavailable")
        return snapshot

    def reload(self, name: str | None = None) -> Any:
        """Load what `CURRENT` names now and serve it; raises MemoryLoadError (the old
        version keeps serving). Names on the same directory all see the new version."""
        from retrieval.memory import Retriever

        name = self._name(name)
        with self._lock:
            retriever = self._retrievers.get(name)
            if retriever is None:  # failed at start: try again from scratch
                retriever = Retriever(self.paths[name], verify=self.verify)
                self._retrievers[name] = retriever
                self._failed.pop(name, None)
            else:
                retriever.reload()
            for other, r in self._retrievers.items():
                if r is retriever and getattr(self._snapshots.get(other), "memory", None) \
                        is not r.memory:
                    self._snapshots[other] = self.snapshot_of(r.memory)
            return self._snapshots[name]

    def warning(self) -> str | None:
        """Why the default memory serves another version than its CURRENT names, or None."""
        retriever = self._retrievers.get(self.default)
        return None if retriever is None else retriever.warning

    def state(self, name: str) -> str:
        return "ready" if name in self._snapshots else "unavailable"

    @property
    def unavailable(self) -> int:
        return len(self._failed)
