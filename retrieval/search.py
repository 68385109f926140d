"""The paper's retrieval rules over a loaded memory, as three named steps:

    knn_search (+ lexical_search / code_search, fuse in hybrid mode) -> apply_rules
    -> neighbours

`search` runs the first two and returns ids and scores (`Hit`), which is what a cache
keeps; `neighbours` reads the hits' documents from the store, once, as the engine takes
them (`model.jobs.NeighbourDoc`).

- **Relevance**: candidates come in score order (inner product of normalised CLIP
  vectors), `k * overfetch` of them so that the rules have room to skip.
- **Hybrid mode**: CLIP never learned names it did not see in training, so a query's
  text is also matched word by word against the captions (BM25, the memory's lexical
  index). The two candidate lists are fused by reciprocal rank fusion: a document's
  relevance is the sum of 1 / (rrf_k + rank) over the lists it is in. Then the
  documents whose caption holds every rare word of the query (a name: see
  `retrieval.lexical_index`) move first, stable: a name is what the user asked for,
  and fusion alone still lets CLIP's favourite outrank a name it cannot read. The rules
  below apply to this order.
- **Hybrid mode, image queries**: CLIP never learned most images either (a flag, a
  logo), so an image query without text is also matched code for code against the
  stored images' VQ codes (`retrieval.code_index`). The candidates are CLIP's and the
  best-agreeing ones; their relevance is the CLIP score plus `code_weight` times the
  agreement (the share of grid cells with the query's code): agreement separates a
  variant of the same image (0.6-0.95) from another image (under 0.3) by a margin CLIP's
  cosines rarely overturn, and CLIP still orders images that agree alike. Stored copies
  of the query image (agreement at least `DUPLICATE_AGREEMENT`) move first, best
  agreement first: a document's vector mixes its caption in, and an appended image
  whose caption names something CLIP never learned scores 0.6-0.8 against its own
  image, below a look-alike CLIP knows (0.9). The rules below apply to this order.
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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from model.jobs import NeighbourDoc

# Hybrid image queries: a stored image whose codes agree with the query's on this share of
# grid cells is taken for a copy of it. Two variants of one world flag (another tint,
# another jitter) mostly agree on 0.6-0.95, two different flags on under 0.3; the
# nearest look-alike of an appended flag in the demo memory on 0.91.
DUPLICATE_AGREEMENT = 0.95

RetrievalMode = Literal["dense", "hybrid"]
RETRIEVAL_MODES: tuple[str, ...] = ("dense", "hybrid")

if TYPE_CHECKING:
    from retrieval.memory import Memory


@dataclass(frozen=True)
class SearchStrategy:
    k: int = 2  # documents kept per query (K=2 in the paper)
    overfetch: int = 8  # candidates fetched per kept document, so the rules can skip
    diversity_threshold: float | None = 0.9  # None disables the diversity rule
    prefer_multimodal: bool = True
    exclude_ids: frozenset[int] = field(default_factory=frozenset)  # for every query
    candidates: int | None = None  # fetch this many first (overrides k * overfetch)
    max_candidates: int = 1024  # widen up to this many when the rules leave fewer than k
    mode: RetrievalMode = "dense"  # "hybrid": fuse with the lexical index (needs query text)
    rrf_k: int = 60  # reciprocal rank fusion's constant (Cormack et al. 2009)
    names_first: bool = True  # hybrid: captions holding the query's rare words (names) first
    image_codes: bool = True  # hybrid: an image query is also matched by its VQ codes
    code_weight: float = 1.0  # hybrid image queries: relevance = CLIP + this * agreement
    duplicates_first: bool = True  # hybrid image queries: stored copies of the image first

    def __post_init__(self) -> None:
        if self.mode not in RETRIEVAL_MODES:
            raise ValueError(f"mode must be one of {RETRIEVAL_MODES}, got {self.mode!r}")

    @property
    def n_candidates(self) -> int:
        return max(self.k, self.candidates or self.k * self.overfetch)

    @classmethod
    def knn(cls, k: int, mode: RetrievalMode = "dense") -> SearchStrategy:
        """Plain top k by score: no modality preference, no diversity rule."""
        return cls(k=k, overfetch=1, diversity_threshold=None, prefer_multimodal=False,
                   mode=mode)

    @classmethod
    def coerce(cls, strategy: Any, k: int | None = None) -> SearchStrategy:
        """A SearchStrategy from ours or a look-alike (the retriever service's
        `RetrievalStrategy`: name "rag"|"knn", candidates, diversity_threshold,
        prefer_multimodal, mode); an explicit `k` wins over the strategy's."""
        if strategy is None:
            return cls(k=k or 2)
        if isinstance(strategy, SearchStrategy):
            return strategy if k is None or k == strategy.k else replace(strategy, k=k)
        k = k or int(getattr(strategy, "k", 2))
        mode = getattr(strategy, "mode", "dense")
        if getattr(strategy, "name", "rag") == "knn":
            return cls.knn(k, mode)
        return cls(
            k=k,
            overfetch=int(getattr(strategy, "overfetch", 8)),
            diversity_threshold=getattr(strategy, "diversity_threshold", 0.9),
            prefer_multimodal=bool(getattr(strategy, "prefer_multimodal", True)),
            exclude_ids=frozenset(getattr(strategy, "exclude_ids", ()) or ()),
            candidates=getattr(strategy, "candidates", None),
            mode=mode,
            image_codes=bool(getattr(strategy, "image_codes", True)),
        )


class Hit(NamedTuple):
    """One document found for a query."""

    id: int
    score: float  # inner product with the query (CLIP), in either mode


# --- step 1: candidates ----------------------------------------------------------------


def knn_search(memory: Memory, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top n (scores, ids) per query, best first; id -1 marks padding."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != memory.dim:
        raise ValueError(f"queries must be (Q, {memory.dim}), got {np.shape(queries)}")
    return memory.index.search(q, max(1, min(n, len(memory))))


def lexical_search(memory: Memory, texts: Sequence[str | None], n: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Top n (BM25 scores, ids) per query text, best first; id -1 marks padding."""
    return memory.lexical.search(texts, max(1, min(n, len(memory))))


def code_search(memory: Memory, codes: Sequence[np.ndarray | None], n: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Top n (agreement, ids) per query image's VQ codes (None: no image), best first;
    id -1 marks padding."""
    return memory.codes.search(codes, max(1, min(n, len(memory))))


def fuse(query: np.ndarray, dense_ids: np.ndarray, lexical_ids: np.ndarray,
         vectors_of: Callable[[np.ndarray], np.ndarray], rrf_k: int,
         named: Callable[[np.ndarray], np.ndarray] | None = None,
         ) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal rank fusion of one query's dense and lexical rankings (-1 = padding).

    Returns (ids, dense) over the union of both lists in fused order: named documents
    first when `named(ids)` (bool per id) is given, then by fused relevance, the higher
    CLIP score, the lower id. `dense` is each candidate's inner product with the query,
    from `vectors_of(ids)`, the stored vectors (the lexical side has no CLIP score).
    """
    fused: dict[int, float] = {}
    for ranking in (dense_ids, lexical_ids):
        for rank, i in enumerate(int(i) for i in ranking if i >= 0):
            fused[i] = fused.get(i, 0.0) + 1.0 / (rrf_k + rank + 1)
    ids = np.fromiter(fused, dtype=np.int64, count=len(fused))
    if not len(ids):
        return ids, np.zeros(0, np.float32)
    dense = (vectors_of(ids) @ query.astype(np.float32)).astype(np.float32)
    relevance = np.fromiter(fused.values(), dtype=np.float64, count=len(fused))
    first = np.zeros(len(ids), bool) if named is None else np.asarray(named(ids), bool)
    order = np.lexsort((ids, -dense, -relevance, ~first))
    return ids[order], dense[order]


def fuse_codes(query: np.ndarray, dense_ids: np.ndarray, code_ids: np.ndarray,
               vectors_of: Callable[[np.ndarray], np.ndarray],
               agreement_of: Callable[[np.ndarray], np.ndarray], code_weight: float,
               duplicate_agreement: float | None = DUPLICATE_AGREEMENT,
               ) -> tuple[np.ndarray, np.ndarray]:
    """One image query's dense and code candidates (-1 = padding): copies of the query
    image (agreement >= `duplicate_agreement`; None: none) first, by agreement; then by
    CLIP score plus `code_weight` times the agreement of their codes with the query's;
    ties by id.

    Returns (ids, dense) in that order, `dense` being each candidate's CLIP score.
    """
    ids = np.unique(np.concatenate([dense_ids[dense_ids >= 0], code_ids[code_ids >= 0]]))
    if not len(ids):
        return ids.astype(np.int64), np.zeros(0, np.float32)
    dense = (vectors_of(ids) @ query.astype(np.float32)).astype(np.float32)
    agreement = np.asarray(agreement_of(ids), dtype=np.float32)
    relevance = dense + np.float32(code_weight) * agreement
    copy = agreement >= duplicate_agreement if duplicate_agreement is not None \
        else np.zeros(len(ids), bool)
    order = np.lexsort((ids, -relevance, -np.where(copy, agreement, 0), ~copy))
    return ids[order].astype(np.int64), dense[order]


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


# --- step 3: the documents -----------------------------------------------------------------


def neighbours(memory: Memory, hits: Sequence[tuple[int, float]], text: str | None = None, *,
               tokens: bool = True, thumbnails: bool = False) -> list[NeighbourDoc]:
    """The documents of `hits` (best first), read from the store in one pass, as the engine
    takes them: image codes as the memory's (h, w) grid, with the stored CLIP vector of
    their reconstruction (what the reranker compares with; none from a memory built
    without them). `tokens=False` leaves out the text ids, codes and vectors,
    `thumbnails=True` adds the stored image bytes; with `text`, each says how its caption
    matches it (see LexicalMatch; a memory without a lexical index says nothing)."""
    ids = [int(i) for i, _ in hits]
    if not ids:
        return []
    docs = memory.store.get(ids, with_image=thumbnails)
    matches = lexical_matches(memory, text, ids)
    grid = memory.image_grid
    stored = getattr(memory, "rerank_vectors", None)
    uniq = np.unique(ids)  # sorted: each row read once, in file order
    vectors = np.asarray(stored[uniq], dtype=np.float32) \
        if tokens and stored is not None else None
    row = {i: r for r, i in enumerate(uniq.tolist())}
    return [
        NeighbourDoc(
            id=i,
            score=float(score),
            caption=doc.caption,
            text_ids=list(doc.text_ids) if tokens and doc.text_ids is not None else None,
            image_codes=_as_grid(doc.image_codes, grid) if tokens else None,
            image_vector=None if vectors is None or doc.image_codes is None
            else vectors[row[i]],
            thumbnail_png=doc.image_bytes if thumbnails else None,
            lexical_score=None if match is None else match.score,
            name_match=None if match is None else match.name_match,
        )
        for i, (_, score), doc, match in zip(ids, hits, docs, matches, strict=True)
    ]


def _as_grid(codes: np.ndarray | None, grid: tuple[int, int] | None) -> np.ndarray | None:
    # the store keeps codes flat; the engine and the wire format take the (h, w) grid
    return codes if codes is None or grid is None else np.asarray(codes).reshape(grid)


def lexical_matches(memory: Memory, text: str | None, ids: Sequence[int]) -> list:
    """A LexicalMatch per id, or None for each when there is no text or lexical index."""
    lexical = getattr(memory, "lexical", None)
    if text is None or lexical is None:
        return [None] * len(ids)
    return lexical.match(text, ids)


def search(
    memory: Memory,
    queries: np.ndarray,
    k: int | None = None,
    strategy: SearchStrategy | Any | None = None,
    *,
    exclude: Sequence[Iterable[int]] | None = None,
    texts: Sequence[str | None] | None = None,
    codes: Sequence[np.ndarray | None] | None = None,
) -> list[list[Hit]]:
    """Up to k hits per query row (Q, D), best first, by the paper's rules; `neighbours`
    reads their documents.

    `texts[q]` is query q's text, if it has one: hybrid mode matches it against the
    captions. `codes[q]` is the VQ codes of query q's image, if it has one: hybrid mode
    matches a query with an image and no text against the stored images' codes. A hybrid
    search with neither is a dense one.
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
    if texts is not None and len(texts) != len(q):
        raise ValueError(f"texts has {len(texts)} entries for {len(q)} queries")
    if codes is not None and len(codes) != len(q):
        raise ValueError(f"codes has {len(codes)} entries for {len(q)} queries")
    texts = list(texts) if texts is not None else [None] * len(q)
    codes = list(codes) if codes is not None else [None] * len(q)
    n = s.n_candidates
    kept = _rank(memory, q, s, n, exclude, texts, codes)
    limit = min(max(s.max_candidates, n), len(memory))
    short = [r for r, row in enumerate(kept) if len(row) < s.k]
    while short and n < limit:
        n = min(4 * n, limit)
        wider = _rank(memory, q[short], s, n,
                      None if exclude is None else [exclude[r] for r in short],
                      [texts[r] for r in short], [codes[r] for r in short])
        for r, row in zip(short, wider, strict=True):
            kept[r] = row
        short = [r for r in short if len(kept[r]) < s.k]
    return [[Hit(i, s) for i, s in row] for row in kept]


def _rank(memory: Memory, q: np.ndarray, s: SearchStrategy, n: int,
          exclude: Sequence[Iterable[int]] | None, texts: Sequence[str | None],
          codes: Sequence[np.ndarray | None]) -> list[list[tuple[int, float]]]:
    """knn_search (+ lexical_search / code_search, fuse) + apply_rules for every query
    row: the kept (id, CLIP score) pairs."""
    scores, ids = knn_search(memory, q, n)
    order = scores  # the relevance the rules sort by
    if s.mode == "hybrid":
        # words where the memory has a lexical index; codes for queries with no words,
        # where the memory has images (the codes matrix is read on the first such query)
        words = [t if getattr(memory, "lexical", None) is not None else None for t in texts]
        images = [c if t is None else None for t, c in zip(texts, codes, strict=True)]
        if not (s.image_codes and any(c is not None for c in images)
                and getattr(memory, "codes", None) is not None):
            images = [None] * len(q)
        if any(t is not None for t in words) or any(c is not None for c in images):
            ids, order, scores = _fused(memory, q, ids, words, images, n, s)
    safe = np.where(ids >= 0, ids, 0)  # -1 padding: its lookups are never used
    vectors = memory.vectors(safe) if s.diversity_threshold is not None else None
    has_image, has_text = memory.has_image(safe), memory.has_text(safe)
    out = []
    for row in range(len(q)):
        kept = apply_rules(q[row], order[row], ids[row], s,
                           vectors=None if vectors is None else vectors[row],
                           has_image=has_image[row], has_text=has_text[row],
                           exclude=() if exclude is None else exclude[row])
        clip_score = dict(zip(ids[row].tolist(), scores[row].tolist(), strict=True))
        out.append([(i, float(clip_score[i])) for i, _ in kept])
    return out


def _fused(memory: Memory, q: np.ndarray, dense_ids: np.ndarray,
           texts: Sequence[str | None], codes: Sequence[np.ndarray | None], n: int,
           s: SearchStrategy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, relevance, CLIP scores), each (Q, width) and -1-padded: every query row's
    dense and lexical (text) or code (image) candidates in fused order, relevance
    descending with position."""
    none = np.full((len(q), 1), -1, dtype=np.int64)
    lexical_ids = lexical_search(memory, texts, n)[1] \
        if any(t is not None for t in texts) else none
    code_ids = code_search(memory, codes, n)[1] if any(c is not None for c in codes) else none

    def named(text: str | None) -> Callable[[np.ndarray], np.ndarray] | None:
        if not s.names_first or text is None:
            return None
        return lambda ids: np.array([m.name_match for m in memory.lexical.match(text, ids)])

    def row(r: int) -> tuple[np.ndarray, np.ndarray]:
        if texts[r] is None and codes[r] is not None:
            return fuse_codes(q[r], dense_ids[r], code_ids[r], memory.vectors,
                              lambda ids: memory.codes.agreement(codes[r], ids), s.code_weight,
                              DUPLICATE_AGREEMENT if s.duplicates_first else None)
        return fuse(q[r], dense_ids[r], lexical_ids[r] if texts[r] is not None else
                    lexical_ids[r][:0], memory.vectors, s.rrf_k, named(texts[r]))

    rows = [row(r) for r in range(len(q))]
    width = max(1, max(len(ids) for ids, _ in rows))
    ids = np.full((len(q), width), -1, dtype=np.int64)
    scores = np.full((len(q), width), -np.inf, dtype=np.float32)
    for r, (i, d) in enumerate(rows):
        ids[r, : len(i)], scores[r, : len(i)] = i, d
    relevance = np.broadcast_to(-np.arange(width, dtype=np.float32), ids.shape)
    return ids, relevance, scores


def drop_tokens(tokens: Sequence[int], p: float = 0.2,
                rng: np.random.Generator | None = None) -> list[int]:
    """Query dropout (training): drop each token with probability p, keep at least one."""
    rng = rng or np.random.default_rng()
    keep = rng.random(len(tokens)) >= p
    if len(tokens) and not keep.any():
        keep[rng.integers(len(tokens))] = True
    return [t for t, kept in zip(tokens, keep, strict=True) if kept]
