"""The paper's retrieval rules over a loaded memory, as three named steps:

    knn_search -> apply_rules -> map_to_metadata

- **Relevance**: candidates come in score order (inner product of normalised CLIP
  vectors), `k * overfetch` of them so that the rules have room to skip.
- **Modality**: documents with both an image and text come first, stable by score.
- **Diversity**: a candidate is skipped if its similarity to the query, or to a document
  already kept, exceeds the threshold (0.9 in the paper): a near-copy of the query (the
  training document itself) or of a kept document adds nothing.
- **Excluded ids**: for training, the document itself.

FAISS pads with id -1 when it finds fewer candidates than asked; those are dropped. If
the rules leave fewer than k documents, the query's candidate pool widens (see
`search`), so k are kept whenever the memory holds k documents that pass.
Query dropout (training queries lose ~20% of their tokens) happens before the query is
embedded: `drop_tokens`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from app.retriever.memory import Memory
    from index_builder.store import DocumentStore


@dataclass(frozen=True)
class SearchStrategy:
    k: int = 2  # documents kept per query (K=2 in the paper)
    overfetch: int = 8  # candidates fetched per kept document, so the rules can skip
    diversity_threshold: float | None = 0.9  # None disables the diversity rule
    prefer_multimodal: bool = True
    exclude_ids: frozenset[int] = field(default_factory=frozenset)  # for every query
    candidates: int | None = None  # fetch this many first (overrides k * overfetch)
    max_candidates: int = 1024  # widen up to this many when the rules leave fewer than k

    @property
    def n_candidates(self) -> int:
        return max(self.k, self.candidates or self.k * self.overfetch)

    @classmethod
    def knn(cls, k: int) -> SearchStrategy:
        """Plain top k by score: no modality preference, no diversity rule."""
        return cls(k=k, overfetch=1, diversity_threshold=None, prefer_multimodal=False)

    @classmethod
    def coerce(cls, strategy: Any, k: int | None = None) -> SearchStrategy:
        """A SearchStrategy from ours or a look-alike (the retriever service's
        `RetrievalStrategy`: name "rag"|"knn", candidates, diversity_threshold,
        prefer_multimodal); an explicit `k` wins over the strategy's."""
        if strategy is None:
            return cls(k=k or 2)
        if isinstance(strategy, SearchStrategy):
            return strategy if k is None or k == strategy.k else replace(strategy, k=k)
        k = k or int(getattr(strategy, "k", 2))
        if getattr(strategy, "name", "rag") == "knn":
            return cls.knn(k)
        return cls(
            k=k,
            overfetch=int(getattr(strategy, "overfetch", 8)),
            diversity_threshold=getattr(strategy, "diversity_threshold", 0.9),
            prefer_multimodal=bool(getattr(strategy, "prefer_multimodal", True)),
            exclude_ids=frozenset(getattr(strategy, "exclude_ids", ()) or ()),
            candidates=getattr(strategy, "candidates", None),
        )


@dataclass
class Neighbour:
    id: int
    score: float  # inner product with the query
    caption: str | None
    text_ids: list[int] | None  # raw BPE ids
    image_codes: np.ndarray | None  # raw VQ codes, flat raster order (memory.image_grid)
    has_image: bool
    has_text: bool
    source: str = ""
    _store: DocumentStore | None = field(default=None, repr=False, compare=False)

    @cached_property
    def image_bytes(self) -> bytes | None:
        """The stored PNG, read from the memory-mapped store on first access."""
        return None if self._store is None else self._store.image_bytes(self.id)


# --- step 1: candidates ----------------------------------------------------------------


def knn_search(memory: Memory, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top n (scores, ids) per query, best first; id -1 marks padding."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != memory.dim:
        raise ValueError(f"queries must be (Q, {memory.dim}), got {np.shape(queries)}")
    return memory.index.search(q, max(1, min(n, len(memory))))


# --- step 2: the rules -------------------------------------------------------------------


def apply_rules(
    query: np.ndarray,
    scores: np.ndarray,
    ids: np.ndarray,
    strategy: SearchStrategy,
    *,
    vectors: np.ndarray | None = None,
    has_image: np.ndarray | None = None,
    has_text: np.ndarray | None = None,
    exclude: Iterable[int] = (),
) -> list[tuple[int, float]]:
    """The kept (id, score) pairs for one query, in the order they are returned.

    `vectors`, `has_image` and `has_text` are aligned with `ids` (the candidates' stored
    vectors and modalities); `vectors` is needed for the diversity rule, the flags for
    the modality preference.
    """
    scores, ids = np.asarray(scores, dtype=np.float32), np.asarray(ids, dtype=np.int64)
    excluded = set(strategy.exclude_ids) | {int(i) for i in exclude}
    usable = [j for j in range(len(ids)) if ids[j] >= 0 and int(ids[j]) not in excluded]
    usable.sort(key=lambda j: -scores[j])  # stable: FAISS order among equal scores
    if strategy.prefer_multimodal and has_image is not None and has_text is not None:
        usable.sort(key=lambda j: not (has_image[j] and has_text[j]))
    threshold = strategy.diversity_threshold
    if threshold is not None and vectors is None:
        raise ValueError("the diversity rule needs the candidates' vectors")
    kept: list[int] = []
    for j in usable:
        if threshold is not None:
            if float(vectors[j] @ query) > threshold:
                continue  # a near-copy of the query (e.g. the training document itself)
            if kept and float(np.max(vectors[kept] @ vectors[j])) > threshold:
                continue  # a near-copy of a document already kept
        kept.append(j)
        if len(kept) == strategy.k:
            break
    return [(int(ids[j]), float(scores[j])) for j in kept]


# --- step 3: metadata --------------------------------------------------------------------


def map_to_metadata(memory: Memory, kept: Sequence[tuple[int, float]]) -> list[Neighbour]:
    docs = memory.store.get([i for i, _ in kept])
    return [Neighbour(id=i, score=s, caption=d.caption, text_ids=d.text_ids,
                      image_codes=d.image_codes, has_image=d.has_image, has_text=d.has_text,
                      source=d.source, _store=memory.store)
            for (i, s), d in zip(kept, docs, strict=True)]


def search(
    memory: Memory,
    queries: np.ndarray,
    k: int | None = None,
    strategy: SearchStrategy | Any | None = None,
    *,
    exclude: Sequence[Iterable[int]] | None = None,
) -> list[list[Neighbour]]:
    """Up to k neighbours per query row (Q, D), by the paper's rules.

    `exclude[q]` lists ids excluded for query q only (training: the document the query
    was cut from), on top of `strategy.exclude_ids`. When the rules skip so many
    candidates that fewer than k remain (a memory holding many near-copies of the
    query), that query's candidate pool widens 4x at a time, up to
    `strategy.max_candidates`.
    """
    s = SearchStrategy.coerce(strategy, k)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    q = q[None] if q.ndim == 1 else q
    if exclude is not None and len(exclude) != len(q):
        raise ValueError(f"exclude has {len(exclude)} entries for {len(q)} queries")
    n = s.n_candidates
    kept = _rank(memory, q, s, n, exclude)
    limit = min(max(s.max_candidates, n), len(memory))
    short = [r for r, row in enumerate(kept) if len(row) < s.k]
    while short and n < limit:
        n = min(4 * n, limit)
        wider = _rank(memory, q[short], s, n,
                      None if exclude is None else [exclude[r] for r in short])
        for r, row in zip(short, wider, strict=True):
            kept[r] = row
        short = [r for r in short if len(kept[r]) < s.k]
    return [map_to_metadata(memory, row) for row in kept]


def _rank(memory: Memory, q: np.ndarray, s: SearchStrategy, n: int,
          exclude: Sequence[Iterable[int]] | None) -> list[list[tuple[int, float]]]:
    """knn_search + apply_rules for every query row: the kept (id, score) pairs."""
    scores, ids = knn_search(memory, q, n)
    safe = np.where(ids >= 0, ids, 0)  # -1 padding: its lookups are never used
    vectors = memory.vectors(safe) if s.diversity_threshold is not None else None
    has_image, has_text = memory.has_image(safe), memory.has_text(safe)
    return [
        apply_rules(q[row], scores[row], ids[row], s,
                    vectors=None if vectors is None else vectors[row],
                    has_image=has_image[row], has_text=has_text[row],
                    exclude=() if exclude is None else exclude[row])
        for row in range(len(q))
    ]


def drop_tokens(tokens: Sequence[int], p: float = 0.2,
                rng: np.random.Generator | None = None) -> list[int]:
    """Query dropout (training): drop each token with probability p, keep at least one."""
    rng = rng or np.random.default_rng()
    keep = rng.random(len(tokens)) >= p
    if len(tokens) and not keep.any():
        keep[rng.integers(len(tokens))] = True
    return [t for t, kept in zip(tokens, keep, strict=True) if kept]
