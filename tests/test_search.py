"""The paper's retrieval rules: on constructed vectors, then through a real memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from retrieval.build import build_memory
from retrieval.memory import Memory
from retrieval.search import SearchStrategy, apply_rules, drop_tokens, neighbours, search
from retrieval.sources import SourceItem
from tests.test_memory import build_demo_memory, tokenize, unit, vq_encode

D = 8


def _basis(i: int) -> np.ndarray:
    v = np.zeros(D, np.float32)
    v[i] = 1.0
    return v


def _between(a: np.ndarray, b: np.ndarray, cos: float) -> np.ndarray:
    """A unit vector at cosine `cos` from unit a, towards b (b orthogonal to a)."""
    return (cos * a + np.sqrt(1 - cos**2) * b).astype(np.float32)


QUERY = _basis(0)


def _rules(vectors, scores=None, ids=None, image=None, text=None, **strategy):
    vectors = np.asarray(vectors, np.float32)
    scores = vectors @ QUERY if scores is None else np.asarray(scores, np.float32)
    ids = np.arange(len(vectors)) if ids is None else np.asarray(ids)
    n = len(vectors)
    return apply_rules(
        QUERY, scores, ids, SearchStrategy(**strategy), vectors=vectors,
        has_image=np.ones(n, bool) if image is None else np.asarray(image),
        has_text=np.ones(n, bool) if text is None else np.asarray(text),
    )


def test_relevance_order_is_by_score() -> None:
    vecs = [_between(QUERY, _basis(i), c) for i, c in ((1, 0.5), (2, 0.8), (3, 0.7))]
    kept = _rules(vecs, k=3, diversity_threshold=None)
    assert [i for i, _ in kept] == [1, 2, 0]
    assert [s for _, s in kept] == pytest.approx([0.8, 0.7, 0.5], abs=1e-6)


def test_diversity_skips_near_copies_of_the_query_and_of_kept_documents() -> None:
    a = _between(QUERY, _basis(1), 0.8)
    vecs = [
        _between(QUERY, _basis(2), 0.95),  # 0: a near-copy of the query
        a,  # 1: kept
        _between(QUERY, unit(0.999 * _basis(1) + 0.045 * _basis(3)), 0.8),  # 2: ~copy of 1
        _between(QUERY, _basis(4), 0.7),  # 3: different
    ]
    vecs[2] = unit(vecs[2])
    assert float(vecs[2] @ a) > 0.9  # the construction really is a near-copy
    assert [i for i, _ in _rules(vecs, k=2)] == [1, 3]
    assert [i for i, _ in _rules(vecs, k=2, diversity_threshold=0.99)] == [0, 1]
    assert [i for i, _ in _rules(vecs, k=3, diversity_threshold=None)] == [0, 1, 2]


def test_modality_preference_puts_complete_documents_first_stable_by_score() -> None:
    vecs = [_between(QUERY, _basis(i + 1), c) for i, c in enumerate((0.8, 0.7, 0.6, 0.5))]
    image = [False, True, True, True]
    text = [True, True, False, True]
    assert [i for i, _ in _rules(vecs, image=image, text=text, k=4)] == [1, 3, 0, 2]
    assert [i for i, _ in _rules(vecs, image=image, text=text, k=4,
                                 prefer_multimodal=False)] == [0, 1, 2, 3]


def test_excluded_ids_are_never_returned() -> None:
    vecs = [_between(QUERY, _basis(i + 1), c) for i, c in enumerate((0.8, 0.7, 0.6))]
    assert [i for i, _ in _rules(vecs, k=2, exclude_ids=frozenset({0}))] == [1, 2]
    kept = apply_rules(QUERY, np.array([0.8, 0.7, 0.6]), np.arange(3),
                       SearchStrategy(k=2), vectors=np.stack(vecs), exclude=[1])
    assert [i for i, _ in kept] == [0, 2]


def test_faiss_padding_is_dropped() -> None:
    vecs = np.stack([_between(QUERY, _basis(1), 0.5), np.zeros(D, np.float32),
                     np.zeros(D, np.float32)])
    kept = _rules(vecs, scores=[0.5, -np.inf, -np.inf], ids=[4, -1, -1], k=2)
    assert kept == [(4, pytest.approx(0.5))]


def test_query_dropout_drops_about_p_and_keeps_one() -> None:
    rng = np.random.default_rng(0)
    tokens = list(range(10_000))
    kept = drop_tokens(tokens, 0.2, rng)
    assert 0.78 < len(kept) / len(tokens) < 0.82
    assert kept == sorted(kept)  # order preserved
    assert all(len(drop_tokens([1, 2, 3], 0.99, rng)) >= 1 for _ in range(50))
    assert drop_tokens([], 0.2, rng) == []
    assert drop_tokens(tokens[:50], 0.2, np.random.default_rng(1)) == drop_tokens(
        tokens[:50], 0.2, np.random.default_rng(1))


@dataclass
class _ServiceStrategy:  # the retriever service's RetrievalStrategy, by shape
    name: str
    prefer_multimodal: bool
    diversity_threshold: float | None
    candidates: int


def test_strategy_coercion() -> None:
    s = SearchStrategy.coerce(_ServiceStrategy("rag", False, 0.8, 40), k=3)
    assert (s.k, s.n_candidates, s.prefer_multimodal, s.diversity_threshold) == (3, 40,
                                                                                  False, 0.8)
    knn = SearchStrategy.coerce(_ServiceStrategy("knn", True, 0.9, 40), k=3)
    assert (knn.k, knn.diversity_threshold, knn.prefer_multimodal) == (3, None, False)
    assert SearchStrategy.coerce(SearchStrategy(k=2, overfetch=5), k=4).n_candidates == 20


# --- through a real memory ------------------------------------------------------------


@pytest.fixture(scope="module")
def memory(tmp_path_factory: pytest.TempPathFactory) -> Memory:
    root = tmp_path_factory.mktemp("mem")
    build_demo_memory(root, 300)
    return Memory.load(root)


def test_search_applies_the_rules_on_a_memory(memory: Memory) -> None:
    q = np.asarray(memory.embeddings[[10, 20]])
    plain = search(memory, q, 2, SearchStrategy.knn(2))
    assert [row[0].id for row in plain] == [10, 20]  # a stored vector finds itself first
    assert plain[0][0].score == pytest.approx(1.0, abs=1e-5)

    rag = search(memory, q, 2, SearchStrategy(k=2))
    for row, own in zip(rag, (10, 20), strict=True):
        assert len(row) == 2 and own not in [n.id for n in row]  # the diversity rule
        ids = np.array([n.id for n in row])
        assert memory.has_image(ids).all() and memory.has_text(ids).all()  # complete docs nearby
        assert row[0].score >= row[1].score
        vecs = memory.vectors(np.array([n.id for n in row]))
        assert float(vecs[0] @ vecs[1]) <= 0.9

    excluded = search(memory, q, 2, SearchStrategy.knn(2), exclude=[[10], []])
    assert 10 not in [n.id for n in excluded[0]] and excluded[1][0].id == 20


def test_search_returns_ids_and_scores_and_neighbours_read_the_documents(memory: Memory) -> None:
    hits = search(memory, np.asarray(memory.embeddings[[4]]), 1, SearchStrategy.knn(1))[0]
    assert [tuple(hit) for hit in hits] == [(4, pytest.approx(1.0, abs=1e-5))]
    doc = memory.document(4)
    nb, = neighbours(memory, hits)
    assert (nb.id, nb.score) == tuple(hits[0])
    assert nb.caption == doc.caption and nb.text_ids == doc.text_ids
    np.testing.assert_array_equal(nb.image_codes, doc.image_codes.reshape(memory.image_grid))
    assert nb.thumbnail_png is None  # the image is read only when asked for
    nb, = neighbours(memory, hits, tokens=False, thumbnails=True)
    assert nb.text_ids is None and nb.image_codes is None
    assert nb.thumbnail_png == doc.image_bytes and nb.thumbnail_png.startswith(b"\x89PNG")
    assert neighbours(memory, []) == []


def test_too_few_documents_pads_and_is_handled(tmp_path: Path) -> None:
    build_demo_memory(tmp_path, 3)
    small = Memory.load(tmp_path)
    rows = search(small, np.asarray(small.embeddings[[0]]), 5, SearchStrategy.knn(5))
    assert sorted(n.id for n in rows[0]) == [0, 1, 2]


def _memory_of(root: Path, vectors: np.ndarray) -> Memory:
    """A memory whose document i (caption "v i") has exactly vectors[i]."""
    items = [SourceItem(None, None, f"v {i}", f"v:{i}") for i in range(len(vectors))]
    build_memory(items, root, embed=lambda caps, _: vectors[[int(c.split()[1]) for c in caps]],
                 tokenize_text=tokenize, encode_images=vq_encode, progress=False)
    return Memory.load(root)


def test_candidates_widen_when_the_rules_skip_them_all(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    query = np.zeros(16, np.float32)
    query[0] = 1
    copies = unit(query + 0.05 * unit(rng.standard_normal((40, 16))))  # cos ~0.999
    others = unit(0.7 * query + 0.7 * np.eye(16, dtype=np.float32)[1:6])  # cos 0.7, apart
    memory = _memory_of(tmp_path, np.vstack([copies, others]))
    rows = search(memory, query[None], 2, SearchStrategy(k=2, overfetch=2))  # 4 candidates
    assert len(rows[0]) == 2 and all(n.id >= 40 for n in rows[0])  # past all the copies
    assert all(n.score == pytest.approx(0.7071, abs=1e-3) for n in rows[0])
    capped = search(memory, query[None], 2, SearchStrategy(k=2, overfetch=2, max_candidates=8))
    assert capped == [[]]  # the pool stops widening at max_candidates
