"""FAISS index choice, build-time tuning, saving and memory-mapped loading (real FAISS)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from retrieval.faiss_index import (
    MMAP,
    VectorIndex,
    build_index,
    choose_index,
    exact_search,
    read_index,
    recall_at,
    rescore,
    tuning_queries,
    write_index,
)


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread() -> Iterator[None]:
    """On a shared, oversubscribed CPU, OpenMP's spinning second thread makes FAISS
    training ~2.5x slower (measured: OPQ on 4k x 32, 8.2 s CPU with 2 threads, 3.4 s
    with 1)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, dim: int, seed: int, centers: int = 64, spread: float = 0.6) -> np.ndarray:
    """Unit vectors around random centres: nearest neighbours are not trivial to find."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_choose_index_follows_the_size() -> None:
    assert choose_index(10_000, 512) == "Flat"
    assert choose_index(200_000, 512) == "IVF1788,Flat"
    assert choose_index(5_000_000, 512) == "OPQ64_512,IVF35777_HNSW32,PQ64"
    assert choose_index(200_000, 512, "hnsw") == "HNSW32"
    assert choose_index(200_000, 96, "ivfpq") == "OPQ12_96,IVF1788_HNSW32,PQ12"
    assert choose_index(200_000, 512, "flat") == "Flat"
    assert choose_index(500, 64, "ivf") == "Flat"  # too few vectors to train lists
    assert choose_index(5_000, 64, "ivfpq").startswith("IVF")  # too few for PQ codebooks
    with pytest.raises(ValueError, match="unknown index type"):
        choose_index(10, 8, "lsh")


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = clustered(20_000, 32, seed=0)
    fresh = tuning_queries(x, 300, np.random.default_rng(99))  # not the tuning queries
    return x, fresh, exact_search(x, fresh, 10)[1]


@pytest.fixture(scope="module")
def built(data) -> dict[str, tuple[VectorIndex, object]]:
    """Indexes built once per module, by type (an ivfpq build is the slow part)."""
    cache: dict[str, tuple[VectorIndex, object]] = {}

    def get(index_type: str):
        if index_type not in cache:
            cache[index_type] = build_index(data[0], index_type, train_size=4096)
        return cache[index_type]

    return get


@pytest.mark.parametrize(("index_type", "knob"), [
    ("hnsw", "efSearch"),
    ("ivf", "nprobe"),
    ("ivfpq", "nprobe"),
])
def test_tuned_index_reaches_recall_and_keeps_it_after_a_mapped_load(
        data, built, tmp_path: Path, index_type: str, knob: str) -> None:
    x, fresh, truth = data
    handle, info = built(index_type)
    assert info.type == index_type and info.n == 20_000 and info.dim == 32
    assert info.recall_at_10 >= 0.95
    assert knob in info.params

    write_index(handle, tmp_path / "index.faiss")
    before = _rss_anon_kb()
    loaded = VectorIndex.load(tmp_path / "index.faiss", info.params, x)
    assert loaded.mmap_mode == MMAP
    assert _rss_anon_kb() - before < 1024  # mapped, not copied (hnsw 8 MB, ivf 3 MB files)
    assert recall_at(loaded.search(fresh, 10)[1], truth) >= 0.93  # unseen queries
    if knob == "nprobe":
        assert faiss.extract_index_ivf(loaded.index).nprobe == info.params["nprobe"]
    else:
        assert faiss.downcast_index(loaded.index).hnsw.efSearch == info.params["efSearch"]
    if index_type != "hnsw":  # the tuning mattered: the cheapest setting falls short
        cheap = VectorIndex(loaded.index, {"nprobe": 1}, x)
        assert recall_at(cheap.search(fresh, 10)[1], truth) < 0.9


def test_ivfpq_needs_and_records_its_refine_factor(data, built) -> None:
    x, fresh, _ = data
    handle, info = built("ivfpq")
    assert info.params["refine_factor"] > 1
    scores, ids = handle.search(fresh[:5], 10)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", fresh[:5], x[ids]), atol=1e-5)
    with pytest.raises(ValueError, match="pass `vectors`"):
        VectorIndex(handle.index, info.params)


def _rss_anon_kb() -> int:
    """Anonymous resident memory: what a process holds privately (not file pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status")


def test_a_mapped_flat_index_is_not_read_into_ram(tmp_path: Path) -> None:
    n, dim = 400_000, 128  # a 205 MB index file
    index = faiss.IndexFlatIP(dim)
    rng = np.random.default_rng(0)
    for _ in range(8):
        index.add(rng.standard_normal((n // 8, dim), dtype=np.float32))
    path = tmp_path / "big.faiss"
    faiss.write_index(index, str(path))
    size_mb = path.stat().st_size / 2**20
    del index
    assert size_mb > 195

    before = _rss_anon_kb()
    loaded, mode = read_index(path)
    loaded.search(rng.standard_normal((1, dim), dtype=np.float32), 5)  # touches every page
    grown_mb = (_rss_anon_kb() - before) / 1024
    assert mode == MMAP and loaded.ntotal == n
    assert grown_mb < 0.1 * size_mb, f"{grown_mb:.0f} MB of {size_mb:.0f} MB in private RAM"


def test_exact_search_streams_and_matches_faiss() -> None:
    x = clustered(3_000, 16, seed=1)
    q = tuning_queries(x, 20, np.random.default_rng(0))
    flat = faiss.IndexFlatIP(16)
    flat.add(x)
    want_s, want_i = flat.search(q, 7)
    got_s, got_i = exact_search(x, q, 7, chunk_rows=500)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    assert recall_at(got_i, want_i, 7) == 1.0
    assert recall_at(got_i[:, ::-1][:, :3], want_i[:, :3], 3) < 1.0


def test_padding_is_kept_as_minus_one() -> None:
    x = clustered(2_000, 16, seed=2, centers=8, spread=0.1)
    index = faiss.index_factory(16, "IVF40,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    scores, ids = VectorIndex(index, {"nprobe": 1}).search(x[:3], 1_000)  # one list < 1000
    assert (ids == -1).any() and np.isneginf(scores[ids == -1]).all()
    assert (ids[:, 0] == np.arange(3)).all()

    cand = np.array([[5, -1, 2, -1]])
    s, i = rescore(x[:1], cand, x, 6)  # more wanted than there are candidates
    assert sorted(i[0, :2].tolist()) == [2, 5] and i[0, 2:].tolist() == [-1] * 4
    assert s[0, 0] >= s[0, 1] and np.isneginf(s[0, 2:]).all()
    np.testing.assert_allclose(s[0, :2], x[i[0, :2]] @ x[0], atol=1e-6)
