"""The retriever role: query -> neighbours, batched, cached, reloadable.

The pipeline reads as three named steps (after clip-retrieval's clip_back):
`compute_query` (CLIP) -> `knn_search` (FAISS + the retrieval rules) -> `map_to_documents`
(the memory-mapped document store, read once per request). The first two run only on a
cache miss, batched across concurrent requests; the cache holds ids and scores, never
documents.

Every request takes one memory snapshot at its start and uses it throughout, and a
reload builds the new snapshot off the event loop before swapping one reference: that is
what makes `POST /admin/reload` lose no request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from fastapi import APIRouter, Depends, Request

from app.batching import DynamicBatcher
from app.cache import NeighbourCache, build_cache, cache_key
from app.errors import ApiError, InvalidRequest
from app.images import decode_rgb_b64
from app.memories import MemoryNotFound, MemorySet
from app.metrics import Metrics
from app.schemas import (
    INTERNAL_IMAGE_LIMITS,
    InfoResponse,
    NeighbourWire,
    ReloadResponse,
    SearchRequest,
    SearchResponse,
)
from app.settings import RetrieverSettings
from model.jobs import NeighbourDoc
from retrieval.search import RETRIEVAL_MODES, neighbours, search

log = logging.getLogger(__name__)

StrategyName = Literal["rag", "knn"]


# --- what the retriever core provides ----------------------------------------------------


@dataclass(frozen=True)
class RetrievalStrategy:
    """The paper's retrieval rules (docs/architecture.md, "The method"); `knn` is plain
    top-k by score. `mode`: "dense" ranks by CLIP alone (the paper), "hybrid" fuses CLIP
    with BM25 over the captions for text queries, and with the stored images' VQ codes
    for image queries (retrieval/search.py). It is part of the cache key."""

    name: StrategyName
    prefer_multimodal: bool
    diversity_threshold: float | None
    candidates: int
    mode: str = "dense"
    image_codes: bool = True  # hybrid image queries also match VQ codes

    def cache_hash(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


class MemorySnapshot(Protocol):
    """One loaded, immutable memory version."""

    version: str
    size: int
    dim: int  # query vector length

    def search(
        self, vectors: np.ndarray, k: int, strategy: RetrievalStrategy,
        texts: Sequence[str | None], codes: Sequence[np.ndarray | None] | None = None,
    ) -> list[list[tuple[int, float]]]:
        """(B, D) L2-normalised queries, their texts and their images' VQ codes (hybrid
        mode matches them against the captions and the stored codes) -> per query up to
        k (doc id, CLIP score), best first."""
        ...

    def neighbours(self, hits: Sequence[tuple[int, float]], text: str | None, tokens: bool,
                   thumbnails: bool) -> list[NeighbourDoc]:
        """The hits' documents, read once, as the engine takes them (with how each caption
        matches `text`): `retrieval.search.neighbours`."""
        ...

    def describe(self) -> dict[str, Any]: ...


class RetrieverBackend(Protocol):
    """Query encoders plus the named memories (app/memories.py). Synchronous; called off
    the event loop. `memory=None` is the default memory, the first name."""

    def memory_names(self) -> list[str]: ...

    def current(self, memory: str | None = None) -> MemorySnapshot: ...

    def reload(self, memory: str | None = None) -> MemorySnapshot:
        """Load the published version and swap it in; raise (old one kept) if refused."""
        ...

    def warning(self) -> str | None:
        """Why the version served is not the one CURRENT names, or None when it is."""
        ...

    def encode_text(self, texts: list[str]) -> np.ndarray: ...

    def encode_image(self, images: list[np.ndarray]) -> np.ndarray: ...

    def encode_codes(self, images: list[np.ndarray]) -> list[np.ndarray | None] | None:
        """The images' VQ codes (hybrid retrieval of image queries), or None when the
        backend has no image tokenizer."""
        ...


BackendFactory = Callable[[RetrieverSettings], RetrieverBackend]


# --- queries -------------------------------------------------------------------------------


@dataclass
class RetrievalQuery:
    text: str | None = None
    image: np.ndarray | None = None  # (H, W, 3) uint8
    embedding: np.ndarray | None = None  # (D,) float

    def __post_init__(self) -> None:
        if self.text is None and self.image is None and self.embedding is None:
            raise InvalidRequest("a query needs text, an image or an embedding")

    def canonical(self) -> bytes:
        """Bytes that are equal exactly when two queries must retrieve the same neighbours."""
        h = hashlib.sha256()
        if self.text is not None:
            text = " ".join(unicodedata.normalize("NFC", self.text).split())
            h.update(b"text\0" + text.encode("utf-8") + b"\0")
        if self.image is not None:
            img = np.ascontiguousarray(self.image, dtype=np.uint8)
            h.update(f"image\0{img.shape}\0".encode() + img.tobytes())
        if self.embedding is not None:
            emb = np.round(np.asarray(self.embedding, dtype=np.float64), 6).astype(np.float32)
            h.update(b"embedding\0" + emb.tobytes())
        return h.digest()


@dataclass
class _SearchJob:
    snapshot: MemorySnapshot  # a batch shares one memory: its key carries the memory name
    query: RetrievalQuery
    k: int
    strategy: RetrievalStrategy


def _normalise(v: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.maximum(norms, 1e-12)).astype(np.float32)


# --- the service ---------------------------------------------------------------------------


@dataclass
class SearchOutcome:
    memory_version: str
    neighbours: list[list[NeighbourDoc]]
    cache_hits: list[bool] = field(default_factory=list)
    memory: str | None = None  # the memory's name


class RetrieverService:
    def __init__(
        self,
        settings: RetrieverSettings,
        backend_factory: BackendFactory,
        metrics: Metrics,
        cache: NeighbourCache | None = None,
    ) -> None:
        self.settings = settings
        self.backend_factory = backend_factory
        self.metrics = metrics
        self.cache = cache or build_cache(
            settings.redis_url,
            ttl_s=settings.cache_ttl_s,
            lru_size=settings.lru_size,
            timeout_s=settings.redis_timeout_s,
            retry_s=settings.redis_retry_s,
            lock_ttl_ms=settings.lock_ttl_ms,
            lock_wait_ms=settings.lock_wait_ms,
            metrics=metrics,
        )
        self.strategies: dict[str, RetrievalStrategy] = {
            "rag": RetrievalStrategy(
                "rag", settings.prefer_multimodal, _diversity_threshold(settings),
                settings.candidates,
            ),
            "knn": RetrievalStrategy("knn", False, None, settings.candidates),
        }
        self.default_mode = settings.retrieval_mode
        self.backend: RetrieverBackend | None = None
        self.batcher = DynamicBatcher(
            "search",
            self._run_batch,
            max_batch_size=settings.search_max_batch_size,
            max_wait_ms=settings.search_max_wait_ms,
            max_queue=settings.search_queue_size,
            metrics=metrics,
        )
        self.state = "loading"
        self._reload_lock = asyncio.Lock()

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._load()
        except Exception as exc:
            log.exception("retriever failed to start")
            self.state = f"failed: {type(exc).__name__}: {exc}"[:300]
            return
        log.info("retriever ready: memory %s (%s)", self.snapshot().version,
                 ", ".join(self.memory_names()))

    async def _load(self) -> None:
        """Load the backend (query encoders and memory) and warm up. Also how a retriever
        that failed to start recovers: `POST /admin/reload` calls this again."""
        backend = await asyncio.to_thread(self.backend_factory, self.settings)
        self.backend = backend
        await self.batcher.start()  # a no-op when already started
        try:
            await self.search([RetrievalQuery(text="warm-up")], k=1, use_cache=False)
        except Exception:
            self.backend = None
            raise
        self.state = "ready"

    async def stop(self) -> None:
        await self.batcher.stop()
        await self.cache.close()

    def snapshot(self, memory: str | None = None) -> MemorySnapshot:
        if self.backend is None:
            raise ApiError("retriever is not loaded")
        return self.backend.current(memory)

    def memory_names(self) -> list[str]:
        return [] if self.backend is None else self.backend.memory_names()

    def _memory_name(self, memory: str | None) -> str:
        names = self.memory_names()
        if memory is None:
            return names[0]
        if memory not in names:
            raise MemoryNotFound(memory, "memory")
        return memory

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def warning(self) -> str | None:
        return self.backend.warning() if self.backend is not None else None

    async def checks(self) -> dict[str, str]:
        memory = self.state
        down = getattr(getattr(self.backend, "memories", None), "unavailable", 0)
        # Serving, but not what CURRENT names: degraded (still serving), never plain ready.
        warning = self.warning() if self.ready else None
        if warning:
            memory = f"degraded: {warning}"
        elif self.ready and down:
            # no names: /readyz is unauthenticated, and names are for keys that may use them
            memory = f"degraded: {down} of {len(self.memory_names())} memories unavailable"
        return {"memory": memory, "cache": await self.cache.check()}

    def describe(self) -> dict[str, Any]:
        """The default memory in full, and every memory's version and size (`memories`)."""
        out: dict[str, Any] = {"state": self.state}
        if self.backend is not None:
            snap = self.snapshot()
            out.update({"name": self.memory_names()[0], "version": snap.version,
                        "documents": snap.size, **snap.describe()})
            out["memories"] = {name: self._summary(name) for name in self.memory_names()}
            if warning := self.warning():
                out["warning"] = warning
        # the mode is per request, not part of a strategy's rules
        out["strategies"] = {k: {f: x for f, x in asdict(v).items() if f != "mode"}
                             for k, v in self.strategies.items()}
        out["retrieval_modes"] = list(RETRIEVAL_MODES)
        out["default_retrieval_mode"] = self.default_mode
        return out

    def _summary(self, name: str) -> dict[str, Any]:
        try:
            snap = self.snapshot(name)
        except ApiError:
            return {"state": "unavailable"}
        return {"state": "ready", "version": snap.version, "documents": snap.size}

    # --- search --------------------------------------------------------------------------

    async def search(
        self,
        queries: Sequence[RetrievalQuery],
        k: int,
        strategy: str = "rag",
        *,
        mode: str | None = None,
        tokens: bool = True,
        thumbnails: bool = False,
        use_cache: bool = True,
        memory: str | None = None,
    ) -> SearchOutcome:
        """`mode`: "dense" or "hybrid"; None: the served default (`retrieval_mode`)."""
        mode = mode or self.default_mode
        if mode not in RETRIEVAL_MODES:
            raise InvalidRequest(f"retrieval mode must be one of {list(RETRIEVAL_MODES)}, "
                                 f"got {mode!r}", param="retrieval.mode")
        name = self._memory_name(memory)
        snap = self.snapshot(name)
        for q in queries:
            if q.embedding is not None and q.embedding.shape != (snap.dim,):
                raise InvalidRequest(
                    f"the embedding must have {snap.dim} values, got {q.embedding.size}",
                    param="embedding_input",
                )
        if k <= 0:
            return SearchOutcome(snap.version, [[] for _ in queries], [False] * len(queries),
                                 name)
        chosen = replace(self.strategies[strategy], mode=mode)
        results = await asyncio.gather(
            *(self._one(name, snap, q, k, chosen, use_cache) for q in queries)
        )
        with self.metrics.stage("map_to_documents"):
            neighbours = [
                self._map_to_documents(snap, hits, q.text, tokens, thumbnails)
                for q, (hits, _) in zip(queries, results, strict=True)
            ]
        hits = [hit for _, hit in results]
        self.metrics.memory_searches.labels(name).inc(len(queries))
        self.metrics.memory_cache_hits.labels(name).inc(sum(hits))
        return SearchOutcome(snap.version, neighbours, hits, name)

    async def _one(
        self,
        name: str,
        snap: MemorySnapshot,
        query: RetrievalQuery,
        k: int,
        strategy: RetrievalStrategy,
        use_cache: bool,
    ) -> tuple[list[tuple[int, float]], bool]:
        async def compute() -> list[tuple[int, float]]:
            job = _SearchJob(snap, query, k, strategy)
            return await self.batcher.submit((name, snap.version, k, strategy), job)

        if not use_cache:
            return await compute(), False
        key = cache_key(snap.version, query.canonical(), k, strategy.cache_hash(), memory=name)
        with self.metrics.stage("cache_lookup_or_search"):
            return await self.cache.get_or_compute(key, compute)

    def _run_batch(self, task: Any, jobs: Sequence[_SearchJob]) -> list[list[tuple[int, float]]]:
        """Runs on the batcher's thread: one encoder pass and one FAISS search per batch."""
        snap, k, strategy = jobs[0].snapshot, jobs[0].k, jobs[0].strategy
        with self.metrics.stage("compute_query"):
            vectors = self._compute_query([j.query for j in jobs])
            codes = self._compute_codes([j.query for j in jobs], strategy)
        with self.metrics.stage("knn_search"):
            return snap.search(vectors, k, strategy, [j.query.text for j in jobs], codes)

    def _compute_codes(self, queries: list[RetrievalQuery], strategy: RetrievalStrategy
                       ) -> list[np.ndarray | None] | None:
        """VQ codes of the image queries without text, where hybrid mode matches them."""
        assert self.backend is not None
        rows = [i for i, q in enumerate(queries) if q.image is not None and q.text is None]
        if strategy.mode != "hybrid" or not strategy.image_codes or not rows:
            return None
        encode = getattr(self.backend, "encode_codes", None)
        found = encode([queries[i].image for i in rows]) if encode is not None else None
        if found is None:
            return None
        codes: list[np.ndarray | None] = [None] * len(queries)
        for i, c in zip(rows, found, strict=True):
            codes[i] = c
        return codes

    def _compute_query(self, queries: list[RetrievalQuery]) -> np.ndarray:
        assert self.backend is not None
        texts = [(i, q.text) for i, q in enumerate(queries) if q.text is not None]
        images = [(i, q.image) for i, q in enumerate(queries) if q.image is not None]
        parts: list[list[np.ndarray]] = [[] for _ in queries]
        if texts:
            vecs = self.backend.encode_text([t for _, t in texts])
            for (i, _), v in zip(texts, vecs, strict=True):
                parts[i].append(v)
        if images:
            vecs = self.backend.encode_image([im for _, im in images])
            for (i, _), v in zip(images, vecs, strict=True):
                parts[i].append(v)
        for i, q in enumerate(queries):
            if q.embedding is not None:
                parts[i].append(_normalise(np.asarray(q.embedding, dtype=np.float32)))
        # Text and image together: the normalised mean, as for a two-part document.
        return _normalise(np.stack([np.mean(_normalise(np.stack(p)), axis=0) for p in parts]))

    def _map_to_documents(
        self,
        snap: MemorySnapshot,
        hits: list[tuple[int, float]],
        text: str | None,
        tokens: bool,
        thumbnails: bool,
    ) -> list[NeighbourDoc]:
        # How captions match the query is not cached with the hits: a few postings
        # lookups, cheaper than a bigger value.
        return snap.neighbours(hits, text, tokens, thumbnails) if hits else []

    # --- reload --------------------------------------------------------------------------

    async def reload(self, memory: str | None = None) -> ReloadResponse:
        if self.backend is None:
            async with self._reload_lock:
                return await self._load_after_failed_start()
        name = self._memory_name(memory)
        async with self._reload_lock:
            try:
                previous = self.snapshot(name).version
            except ApiError:
                previous = None  # unavailable since start: this reload retries it
            start = time.perf_counter()
            try:
                snap = await asyncio.to_thread(self.backend.reload, name)
            except Exception as exc:
                log.warning("memory reload refused: %s", exc)
                warning = self.warning()  # names what CURRENT holds, without paths
                raise _reload_refused(
                    f"memory reload refused: {warning}" if warning
                    else f"memory reload refused, still serving {previous}: {exc}") from None
            self.metrics.stage_latency.labels("memory_reload").observe(time.perf_counter() - start)
        log.info("memory %s reloaded: %s -> %s", name, previous, snap.version)
        return ReloadResponse(
            memory_version=snap.version,
            previous_version=previous,
            changed=snap.version != previous,
            documents=snap.size,
            memory=name,
        )

    async def _load_after_failed_start(self) -> ReloadResponse:
        try:
            await self._load()
        except Exception as exc:
            log.warning("memory reload refused: %s", exc)
            self.state = f"failed: {type(exc).__name__}: {exc}"[:300]
            raise _reload_refused(f"memory reload refused, nothing is served: {exc}") from None
        snap = self.snapshot()
        log.info("memory loaded on reload: %s", snap.version)
        return ReloadResponse(memory_version=snap.version, previous_version=None, changed=True,
                              documents=snap.size)


def _reload_refused(message: str) -> ApiError:
    err = ApiError(message)
    err.status_code, err.error_type, err.code = 409, "conflict_error", "reload_refused"
    return err


# --- HTTP (the retriever role) --------------------------------------------------------------


def _diversity_threshold(settings: RetrieverSettings) -> float:
    """The configured threshold, else the one the bundle was trained with."""
    from model.bundle import bundle_diversity_threshold

    manifest_path = Path(settings.bundle_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return bundle_diversity_threshold(manifest, settings.diversity_threshold)


def _service(request: Request) -> RetrieverService:
    return request.app.state.retriever_service


def build_router(require_key: Callable[..., Any]) -> APIRouter:
    """Internal routes of the retriever role (the gateway's HttpRetrieverClient calls them)."""
    router = APIRouter()
    limits = INTERNAL_IMAGE_LIMITS

    @router.post(
        "/internal/search", response_model=SearchResponse, dependencies=[Depends(require_key)]
    )
    async def internal_search(
        body: SearchRequest, svc: RetrieverService = Depends(_service)
    ) -> SearchResponse:
        queries = [
            RetrievalQuery(
                text=q.text,
                image=None if q.image is None else decode_rgb_b64(q.image, "image", limits),
                embedding=None if q.embedding is None else np.asarray(q.embedding, np.float32),
            )
            for q in body.queries
        ]
        out = await svc.search(
            queries, body.k, body.strategy, mode=body.mode, tokens=body.tokens,
            thumbnails=body.thumbnails, memory=body.memory,
        )
        return SearchResponse(
            memory_version=out.memory_version,
            memory=out.memory,
            results=[[NeighbourWire.from_doc(d) for d in docs] for docs in out.neighbours],
        )

    @router.post(
        "/admin/reload", response_model=ReloadResponse, dependencies=[Depends(require_key)]
    )
    async def admin_reload(
        memory: str | None = None, svc: RetrieverService = Depends(_service)
    ) -> ReloadResponse:
        return await svc.reload(memory)

    @router.get("/v1/info", response_model=InfoResponse, response_model_exclude_none=True)
    async def info(request: Request, svc: RetrieverService = Depends(_service)) -> InfoResponse:
        return InfoResponse(
            version=request.app.version,
            role="retriever",
            memory=svc.describe(),
            cache=svc.cache.describe(),
        )

    return router


# --- the real backend: CLIP from the bundle + the retriever core's memory ----------------


class CoreRetrieverBackend:
    """Adapts the retriever core to `RetrieverBackend`: the bundle's CLIP encodes queries,
    `retrieval.memory.Retriever` holds the verified, memory-mapped memory (and swaps
    versions atomically), `retrieval.search.search` applies the paper's rules."""

    def __init__(self, settings: RetrieverSettings, clip: Any, vq: Any = None) -> None:
        self.settings = settings
        self.clip = clip
        self.vq = vq  # the bundle's image tokenizer: image queries' codes (None: no codes)
        self.memories = MemorySet(settings.named_memories, "auto", _CoreSnapshot)

    @classmethod
    def load(cls, settings: RetrieverSettings, clip: Any = None, vq: Any = None
             ) -> CoreRetrieverBackend:
        if clip is None:
            from model.bundle import Bundle

            bundle = Bundle(settings.bundle_dir, device=settings.device)
            clip, vq = bundle.clip, bundle.vq if bundle.has("vq") else None
        return cls(settings, clip, vq)

    def memory_names(self) -> list[str]:
        return list(self.memories.names)

    def current(self, memory: str | None = None) -> MemorySnapshot:
        return self.memories.current(memory)

    def reload(self, memory: str | None = None) -> MemorySnapshot:
        # Raises MemoryLoadError for a corrupt or half-written version; the old one keeps
        # serving. The same version again is a no-op (the loaded snapshot is kept).
        return self.memories.reload(memory)

    def warning(self) -> str | None:
        return self.memories.warning()

    def encode_text(self, texts: list[str]) -> np.ndarray:
        return self.clip.encode_text(texts)

    def encode_image(self, images: list[np.ndarray]) -> np.ndarray:
        return self.clip.encode_image(images)  # a list: sizes may differ

    def encode_codes(self, images: list[np.ndarray]) -> list[np.ndarray | None] | None:
        if self.vq is None:
            return None
        size = self.vq.config.image_size
        out: list[np.ndarray | None] = [None] * len(images)
        # the stored codes are of images at the bundle's size (the API's decoding size)
        rows = [i for i, im in enumerate(images) if im.shape[:2] == (size, size)]
        if rows:
            codes = self.vq.encode_images([images[i] for i in rows])
            for i, c in zip(rows, codes, strict=True):
                out[i] = c
        return out


class _CoreSnapshot:
    def __init__(self, memory: Any) -> None:
        self.memory = memory
        self.version = str(memory.version)
        self.size = len(memory)
        self.dim = int(memory.dim)

    def search(
        self, vectors: np.ndarray, k: int, strategy: RetrievalStrategy,
        texts: Sequence[str | None], codes: Sequence[np.ndarray | None] | None = None,
    ) -> list[list[tuple[int, float]]]:
        rows = search(self.memory, vectors, k, strategy, texts=texts, codes=codes)
        return [[(int(hit.id), float(hit.score)) for hit in row] for row in rows]

    def neighbours(self, hits: Sequence[tuple[int, float]], text: str | None, tokens: bool,
                   thumbnails: bool) -> list[NeighbourDoc]:
        return neighbours(self.memory, hits, text, tokens=tokens, thumbnails=thumbnails)

    def describe(self) -> dict[str, Any]:
        spec = self.memory.spec
        return {
            "path": str(self.memory.path),
            "embedding_dim": int(spec.embedding_dim),
            "image_grid": spec.image_grid,
            "counts": spec.counts,
            "index": spec.index,
            "components": spec.components,
            "parent": spec.parent,
            "created": spec.created,
            "lexical": None if self.memory.lexical is None else {
                **self.memory.lexical.describe(),
                "built_at_load": not spec.lexical,  # a memory from before the index
            },
        }
