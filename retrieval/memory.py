"""Loading a memory version for serving: verified, memory-mapped, swappable.

`Memory.load` resolves CURRENT, refuses a version whose manifest is missing, unreadable
or not `complete`, or whose files are missing, resized or fail their checksums, with a
`MemoryLoadError` naming the file and the problem. Then it memory-maps the FAISS index,
the Arrow store, the embeddings and the lexical (BM25) index's postings: replicas share
the page cache, and only the pages a search touches become resident. A version built
before the lexical index existed still loads: its lexical index is built in memory from
the store's captions (a few seconds per 100k documents), and the log says so. A version
built without rerank vectors (`RERANK_FILE`) loads too: its neighbours carry none, and
the engine's reranker computes them.

Checksums (`verify`): "full" hashes every byte; "fast" checks sizes and the sha256 of
each file's first and last MiB (catches truncation, swapped files and torn writes at the
ends, not a flipped byte in the middle); "auto" (the default) hashes files below
FULL_CHECK_BELOW in full and checks larger ones fast, so a 1M-document memory (2 GB of
vectors) still loads in seconds; "none" skips checksums (sizes are still checked).

`Retriever` holds the memory being served and swaps in a new version atomically: the new
one is loaded and verified completely first, then a single reference assignment switches
it; a search in flight finishes on the object it started with. When the version CURRENT
names is refused at start-up (CURRENT unreadable, or its version damaged), it serves the
newest valid version instead and says so in `warning` until a reload succeeds, so one bad
pointer does not keep the service down.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval import publish as pub
from retrieval.code_index import CodeIndex
from retrieval.faiss_index import IndexInfo, VectorIndex
from retrieval.lexical_index import LEXICAL_DIR, LexicalIndex, lexical_files
from retrieval.manifest import (
    EMBEDDINGS_FILE,
    INDEX_FILE,
    RERANK_FILE,
    STORE_FILE,
    Manifest,
    ManifestError,
    read_manifest,
    verify_file,
)
from retrieval.search import Hit, SearchStrategy, search
from retrieval.store import DocumentStore, StoredDoc, open_embeddings

log = logging.getLogger(__name__)

FULL_CHECK_BELOW = 256 * 1024 * 1024
VERIFY_MODES = ("auto", "full", "fast", "none")


class MemoryLoadError(RuntimeError):
    """This memory version cannot be served; the message names the file and the problem."""


class Memory:
    """One loaded, immutable memory version."""

    def __init__(self, path: Path, manifest: Manifest, index: VectorIndex,
                 store: DocumentStore, embeddings: np.ndarray,
                 lexical: LexicalIndex | None = None,
                 rerank_vectors: np.ndarray | None = None) -> None:
        self.path = path
        self.spec = manifest
        self.manifest: dict[str, Any] = manifest.to_dict()  # as JSON, for /v1/info
        self.index = index
        self.store = store
        self.embeddings = embeddings  # (N, D) float32 memmap: diversity rule, re-scoring
        self.lexical = lexical  # BM25 over captions: hybrid retrieval, name matches
        # (N, D) float32 memmap: CLIP vectors of the VQ-reconstructed images, which
        # neighbours carry to the t2i reranker; None for a version built without them
        self.rerank_vectors = rerank_vectors
        self.has_image_flags, self.has_text_flags = store.modality_flags()
        self._codes: CodeIndex | None = None
        self._codes_lock = threading.Lock()

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def dim(self) -> int:
        return int(self.spec.embedding_dim)

    @property
    def image_grid(self) -> tuple[int, int] | None:
        return tuple(self.spec.image_grid) if self.spec.image_grid else None

    @property
    def index_info(self) -> IndexInfo:
        return IndexInfo.from_dict(self.spec.index)

    def __len__(self) -> int:
        return len(self.store)

    def __repr__(self) -> str:
        return (f"Memory({self.path}, {len(self)} documents, {self.spec.index['factory']}, "
                f"{self.index.mmap_mode})")

    @classmethod
    def load(cls, memory_dir: str | Path, version: str | None = None,
             verify: str = "auto") -> Memory:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}")
        root = Path(memory_dir)
        try:
            version = version or pub.current_version(root)
        except pub.PublishError as e:
            raise MemoryLoadError(str(e)) from e
        if version is None:
            raise MemoryLoadError(
                f"no memory at {root} (no CURRENT pointer); build one with `racm3 build-index "
                f"--source world --input memory --out {root}`")
        vdir = pub.version_dir(root, version)
        if not vdir.is_dir():
            raise MemoryLoadError(f"memory version {vdir} does not exist")
        try:
            manifest = read_manifest(vdir)
            _verify_files(vdir, manifest, verify)
        except ManifestError as e:
            raise MemoryLoadError(f"refusing memory {version}: {e}") from e
        embeddings = _open(vdir / EMBEDDINGS_FILE, open_embeddings)
        index = _open(vdir / INDEX_FILE, lambda p: VectorIndex.load(
            p, manifest.index.get("params", {}), embeddings))
        store = _open(vdir / STORE_FILE, DocumentStore.open)
        rerank = _open(vdir / RERANK_FILE, open_embeddings) \
            if RERANK_FILE in manifest.files else None
        sizes = {"index": index.ntotal, "store": len(store), "embeddings": len(embeddings),
                 "manifest": int(manifest.counts.get("documents", -1))}
        if rerank is not None:
            sizes["rerank_vectors"] = len(rerank)
        if len(set(sizes.values())) != 1 or embeddings.shape[1] != manifest.embedding_dim \
                or (rerank is not None and rerank.shape[1] != manifest.embedding_dim):
            raise MemoryLoadError(f"refusing memory {version}: its parts disagree: {sizes}, "
                                  f"dim {embeddings.shape[1]} vs {manifest.embedding_dim}")
        if index.dim != manifest.embedding_dim:
            raise MemoryLoadError(f"refusing memory {version}: index dim {index.dim}, "
                                  f"manifest {manifest.embedding_dim}")
        lexical = _load_lexical(vdir, manifest, store)
        memory = cls(vdir, manifest, index, store, embeddings, lexical, rerank)
        log.info("loaded %r", memory)
        return memory

    @property
    def codes(self) -> CodeIndex | None:
        """The stored images' VQ codes (hybrid retrieval of image queries), read from the
        store on first use; None for a memory without an image grid."""
        if self._codes is None and self.image_grid is not None:
            with self._codes_lock:
                if self._codes is None:
                    h, w = self.image_grid
                    self._codes = CodeIndex.from_store(self.store, h * w)
        return self._codes

    def document(self, i: int, with_image: bool = True) -> StoredDoc:
        return self.store.get([i], with_image=with_image)[0]

    def documents(self, ids: list[int], with_image: bool = True) -> list[StoredDoc]:
        return self.store.get(ids, with_image=with_image)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored document vectors, shape ids.shape + (D,); each distinct row read once,
        in file order (kind to the memory map)."""
        ids = np.asarray(ids, dtype=np.int64)
        uniq, inverse = np.unique(ids.reshape(-1), return_inverse=True)
        rows = np.asarray(self.embeddings[uniq], dtype=np.float32)
        return rows[inverse.reshape(-1)].reshape(*ids.shape, -1)

    def has_image(self, ids: np.ndarray) -> np.ndarray:
        return self.has_image_flags[np.asarray(ids, dtype=np.int64)]

    def has_text(self, ids: np.ndarray) -> np.ndarray:
        return self.has_text_flags[np.asarray(ids, dtype=np.int64)]


def _verify_files(vdir: Path, manifest: Manifest, verify: str) -> None:
    optional = [RERANK_FILE] if RERANK_FILE in manifest.files else []
    for name in (INDEX_FILE, STORE_FILE, EMBEDDINGS_FILE, *optional,
                 *lexical_files(manifest.files)):
        entry = manifest.files.get(name)
        if entry is None:
            raise ManifestError(f"the manifest does not list {name}")
        if verify == "none":
            full = None
        else:
            full = verify == "full" or (verify == "auto" and entry.bytes < FULL_CHECK_BELOW)
        if full is None:
            path = vdir / name
            if not path.is_file() or path.stat().st_size != entry.bytes:
                raise ManifestError(f"{path} is missing or not {entry.bytes} bytes")
        else:
            verify_file(vdir / name, entry, full)


def _current_or_none(memory_dir: Path) -> str | None:
    try:
        return pub.current_version(memory_dir)
    except pub.PublishError:
        return None


def _load_lexical(vdir: Path, manifest: Manifest, store: DocumentStore) -> LexicalIndex:
    """The version's lexical index (its files were verified with the others), or, for a
    version built without one, one built now from the store's captions."""
    if lexical_files(manifest.files):
        lexical = _open(vdir / LEXICAL_DIR, lambda folder: LexicalIndex.load(folder.parent))
        if len(lexical) != len(store):
            raise MemoryLoadError(f"refusing memory {manifest.version}: the lexical index "
                                  f"holds {len(lexical)} documents, the store {len(store)}")
        return lexical
    log.info("memory %s has no lexical index (built before hybrid retrieval): building "
             "one from its %d captions", manifest.version, len(store))
    return _open(vdir / STORE_FILE, lambda _: LexicalIndex.from_store(store))


def _open(path: Path, opener: Any) -> Any:
    try:
        return opener(path)
    except Exception as e:  # FAISS, Arrow and numpy raise many types for damaged files
        raise MemoryLoadError(f"memory file {path} cannot be opened: {e}") from e


class Retriever:
    """The memory being served, swapped atomically by `reload`. Thread-safe: readers take
    `self.memory` once per request and never lock.

    `warning` is None while the served version is the one CURRENT names; otherwise it
    says what CURRENT holds, why that was refused and what is served instead."""

    def __init__(self, memory_dir: str | Path, verify: str = "auto") -> None:
        self.memory_dir = Path(memory_dir)
        self.verify = verify
        self.warning: str | None = None
        self._lock = threading.Lock()
        self._memory = self._load_at_start()

    def _load_at_start(self) -> Memory:
        try:
            return Memory.load(self.memory_dir, verify=self.verify)
        except MemoryLoadError as exc:
            problem = exc
        named = _current_or_none(self.memory_dir)
        for version in reversed(pub.list_versions(self.memory_dir)):
            if version == named:
                continue
            try:
                memory = Memory.load(self.memory_dir, version, verify=self.verify)
            except MemoryLoadError as exc:
                log.warning("memory %s is not valid either: %s", version, exc)
                continue
            self.warning = (f"{self._short(problem)}; serving {version}, the newest valid "
                            "version, instead: fix CURRENT, then POST /admin/reload")
            log.warning("memory: %s; serving %s, the newest valid version, instead. Fix "
                        "CURRENT, then POST /admin/reload", problem, version)
            return memory
        raise problem

    def _short(self, problem: Exception) -> str:
        """The problem without the memory's location: clients see versions, not paths."""
        if not (self.memory_dir / pub.CURRENT).is_file():
            return f"there is no {pub.CURRENT} file"
        return str(problem).replace(f"{self.memory_dir}/", "")

    @property
    def memory(self) -> Memory:
        return self._memory

    @property
    def version(self) -> str:
        return self._memory.version

    def reload(self, version: str | None = None) -> Memory:
        """Load `version` (default: what CURRENT names now) and serve it. If it is the one
        being served, nothing changes. On MemoryLoadError the old version keeps serving,
        and a refused CURRENT is reported in `warning`."""
        with self._lock:  # one reload at a time; searches never take this lock
            old = self._memory
            try:
                target = version or pub.current_version(self.memory_dir)
                if target == old.version:
                    new = old
                else:
                    new = Memory.load(self.memory_dir, target, verify=self.verify)
            except (pub.PublishError, MemoryLoadError) as e:
                if version is None:
                    self.warning = (f"{self._short(e)}; still serving {old.version}: fix "
                                    "CURRENT, then POST /admin/reload")
                if isinstance(e, MemoryLoadError):
                    raise
                raise MemoryLoadError(str(e)) from e
            if version is None:
                self.warning = None
            if new is not old:
                self._memory = new  # one reference assignment: atomic for readers
                log.info("now serving memory %s (was %s)", new.version, old.version)
            return new

    def search(self, queries: np.ndarray, k: int | None = None,
               strategy: SearchStrategy | None = None,
               exclude: Sequence[Iterable[int]] | None = None,
               texts: Sequence[str | None] | None = None,
               codes: Sequence[np.ndarray | None] | None = None) -> list[list[Hit]]:
        return search(self._memory, queries, k, strategy, exclude=exclude, texts=texts,
                      codes=codes)
