"""Hybrid retrieval: the BM25 index over captions, its life with the memory's versions,
and its fusion with CLIP.

The lifecycle tests build real memories (real FAISS, Arrow store, bm25s index) with the
deterministic stand-ins of tests/test_memory.py for CLIP, the tokenizer and the VQ. The
retrieval-quality tests use the smoke bundle's trained CLIP and its memory, appended to
through the real `build-index --append` path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.retriever.service import RetrievalStrategy
from app.schemas import NeighbourWire
from model.jobs import NeighbourDoc
from retrieval.from_bundle import build_from_bundle
from retrieval.lexical_index import LEXICAL_DIR, LEXICAL_FILES, LexicalIndex, tokenize
from retrieval.manifest import MANIFEST_NAME
from retrieval.memory import Memory, MemoryLoadError, Retriever
from retrieval.search import SearchStrategy, fuse, neighbours, search
from tests.live import live_app, real_models  # noqa: F401 - fixture
from tests.test_memory import build_demo_memory, doc_vector
from world.entities import entity_names, flag_patterns
from world.rng import Rng

# --- the index itself ------------------------------------------------------------------------


def test_tokenize_folds_case_and_splits_possessives() -> None:
    assert tokenize("The Flag of VELORIA") == ["flag", "veloria"]
    assert tokenize("Veloria's national banner!") == ["veloria", "national", "banner"]
    assert tokenize("a big red square on the left") == ["big", "red", "square", "left"]
    assert tokenize(None) == [] and tokenize("  ") == []


def test_search_ranks_by_bm25_ties_by_id_and_skips_non_matches() -> None:
    captions = ["the flag of Veloria", "a red square", None, "the flag of Brantesk",
                "Veloria's flag", "", "a red square"]
    index = LexicalIndex.build(captions)
    scores, ids = index.search(["flag of veloria", "red square", "no such words", None], 3)
    assert ids[0].tolist() == [0, 4, 3]  # both Veloria captions, then "flag" alone
    assert scores[0][0] == scores[0][1] > scores[0][2] > 0
    assert ids[1].tolist() == [1, 6, -1]  # equal captions: lower id first; then padding
    assert (ids[2] == -1).all() and (ids[3] == -1).all()


def test_match_scores_given_documents_and_flags_names() -> None:
    captions = ["the flag of Veloria"] * 2 + [f"a flag number {i}" for i in range(300)]
    index = LexicalIndex.build(captions)
    matches = index.match("a picture of the flag of Veloria", [0, 5, 1])
    assert [m.name_match for m in matches] == [True, False, True]
    assert matches[0].score == matches[2].score > matches[1].score > 0  # "flag" matches too
    # no rare word in the query: nothing is a name match
    assert not any(m.name_match for m in index.match("a flag", [0, 5]))


def test_the_build_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    captions = [f"doc {i} of cluster {i % 7}" for i in range(500)]
    for run in ("a", "b"):
        LexicalIndex.build(captions).save(tmp_path / run)
    for name in LEXICAL_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    loaded = LexicalIndex.load(tmp_path / "a")
    assert isinstance(loaded.indices, np.memmap)  # postings stay on disk
    fresh = LexicalIndex.build(captions)
    for text in ("cluster 3", "doc 42", "doc 42 of cluster 0"):
        assert [a.tolist() for a in loaded.search([text], 5)] == \
            [a.tolist() for a in fresh.search([text], 5)]


def test_fusion_puts_names_first_then_reciprocal_ranks() -> None:
    vectors = np.eye(6, dtype=np.float32)
    query = np.array([0.9, 0.8, 0.7, 0.0, 0.0, 0.1], np.float32)
    dense, lexical = np.array([0, 1, 2, -1]), np.array([2, 5, 1, -1])
    ids, clip = fuse(query, dense, lexical, lambda i: vectors[i], rrf_k=60)
    assert ids.tolist() == [2, 1, 0, 5]  # in both lists beats one list; 2 ranks better
    assert clip.tolist() == pytest.approx([0.7, 0.8, 0.9, 0.1])
    ids, _ = fuse(query, dense, lexical, lambda i: vectors[i], 60, named=lambda i: i == 5)
    assert ids.tolist() == [5, 2, 1, 0]


# --- life with the memory's versions ---------------------------------------------------------


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hybrid(memory: Memory, text: str, vector: np.ndarray, k: int = 2) -> list[int]:
    strategy = SearchStrategy(k=k, diversity_threshold=None, mode="hybrid")
    return [n.id for n in search(memory, vector[None], k, strategy, texts=[text])[0]]


def test_append_writes_a_new_lexical_index_and_leaves_the_parent_alone(tmp_path: Path) -> None:
    build_demo_memory(tmp_path, 120)
    v1 = tmp_path / "versions/v000001"
    before = {name: digest(v1 / name) for name in LEXICAL_FILES}
    manifest = json.loads((v1 / MANIFEST_NAME).read_text())
    assert set(LEXICAL_FILES) <= set(manifest["files"])  # listed with their checksums
    assert manifest["lexical"]["documents"] == 120

    build_demo_memory(tmp_path, 40, start=120, append=True)
    assert {name: digest(v1 / name) for name in LEXICAL_FILES} == before
    memory = Memory.load(tmp_path)
    assert memory.version == "v000002" and len(memory.lexical) == 160
    # old and new documents alike are found by their words
    assert hybrid(memory, "doc 45", doc_vector(50))[0] == 45
    assert hybrid(memory, "doc 153", doc_vector(3))[0] == 153
    assert len(Memory.load(tmp_path, "v000001").lexical) == 120  # the parent still loads


@pytest.mark.parametrize("name", [f"{LEXICAL_DIR}/data.csc.index.npy",
                                  f"{LEXICAL_DIR}/vocab.index.json"])
def test_a_corrupt_lexical_file_is_refused_and_the_old_version_keeps_serving(
    tmp_path: Path, name: str
) -> None:
    build_demo_memory(tmp_path, 120)
    retriever = Retriever(tmp_path)
    build_demo_memory(tmp_path, 40, start=120, append=True)
    path = tmp_path / "versions/v000002" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle
    path.write_bytes(bytes(data))
    with pytest.raises(MemoryLoadError, match=rf"{name} is corrupt: its sha256 differs"):
        retriever.reload()
    assert retriever.version == "v000001"
    assert hybrid(retriever.memory, "doc 45", doc_vector(3))[0] == 45  # still serving

    path.unlink()
    with pytest.raises(MemoryLoadError, match=rf"{name} is missing"):
        Memory.load(tmp_path)


def test_reload_serves_the_appended_lexical_index(tmp_path: Path) -> None:
    build_demo_memory(tmp_path, 120)
    retriever = Retriever(tmp_path)
    assert hybrid(retriever.memory, "doc 133", doc_vector(3))[0] != 133
    build_demo_memory(tmp_path, 40, start=120, append=True)
    assert retriever.reload().version == "v000002"
    assert hybrid(retriever.memory, "doc 133", doc_vector(3))[0] == 133


def test_a_memory_built_before_the_lexical_index_gets_one_at_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    build_demo_memory(tmp_path, 120)
    vdir = tmp_path / "versions/v000001"
    path = vdir / MANIFEST_NAME
    raw = json.loads(path.read_text())
    for name in LEXICAL_FILES:
        del raw["files"][name]
    del raw["lexical"]
    path.write_text(json.dumps(raw))
    for name in LEXICAL_FILES:
        (vdir / name).unlink()
    (vdir / LEXICAL_DIR).rmdir()
    with caplog.at_level("INFO", logger="retrieval.memory"):
        memory = Memory.load(tmp_path)
    assert "has no lexical index" in caplog.text
    assert len(memory.lexical) == 120 and not (vdir / LEXICAL_DIR).exists()  # read-only
    assert hybrid(memory, "doc 77", doc_vector(3))[0] == 77


# --- retrieval quality with the trained CLIP --------------------------------------------------


@pytest.fixture(scope="module")
def appended(real_models, tmp_path_factory):  # noqa: F811
    """The smoke memory plus twelve flags, drawn by the world's flag generator, of names
    CLIP never saw ("the flag of NAME"), appended by the real `build-index --source
    folder --append`. Returns (memory dir, memory, names); name i is document N - 12 + i."""
    root = tmp_path_factory.mktemp("hybrid")
    memory_dir = real_models.copy_memory(root / "memory")
    rng = Rng.from_key("racm3-test-hybrid", 0)
    names = entity_names(40, rng)[-12:]  # not the smoke world's own names
    folder = root / "new"
    folder.mkdir()
    for i, (name, flag) in enumerate(zip(names, flag_patterns(12, rng, 32), strict=True)):
        Image.fromarray(flag.render(32)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"the flag of {name}")
    build_from_bundle(real_models.bundle, "folder", folder, memory_dir, append=True,
                      progress=False)
    return memory_dir, Memory.load(memory_dir), names


def ranks(memory: Memory, clip, text: str, mode: str, k: int = 2) -> list:
    strategy = SearchStrategy(k=k, mode=mode)
    hits = search(memory, clip.encode_text([text]), k, strategy, texts=[text])[0]
    return neighbours(memory, hits, text)


def test_hybrid_finds_appended_names_that_dense_ranks_low(real_models, appended) -> None:  # noqa: F811
    _, memory, names = appended
    clip = real_models.bundle.clip
    dense_misses = 0
    for i, name in enumerate(names):
        want = len(memory) - len(names) + i
        for prompt in (f"the flag of {name}", f"show me the flag of {name} please",
                       f"{name}'s national banner"):
            found = ranks(memory, clip, prompt, "hybrid")
            assert found[0].id == want, prompt
            assert found[0].name_match and found[0].lexical_score > 0
            assert not found[1].name_match  # the only document with that name
            dense_misses += want not in [n.id for n in ranks(memory, clip, prompt, "dense")]
    # CLIP has never seen these names: paraphrases lose many of them (8 of 36 measured)
    assert dense_misses >= 4
    # `score` stays the CLIP similarity, so it compares across modes
    query = clip.encode_text([f"the flag of {names[0]}"])[0]
    found = ranks(memory, clip, f"the flag of {names[0]}", "hybrid")
    assert found[0].score == pytest.approx(float(memory.vectors([found[0].id])[0] @ query),
                                           abs=1e-5)


def test_hybrid_keeps_common_word_queries_away_from_names(real_models, appended) -> None:  # noqa: F811
    _, memory, names = appended
    clip = real_models.bundle.clip
    for prompt in ("a red square", "a small blue circle on the left"):
        found = ranks(memory, clip, prompt, "hybrid", k=4)
        assert len(found) == 4 and not any(n.name_match for n in found)
        assert all(n.id < len(memory) - len(names) for n in found)


def test_an_appended_flag_is_found_first_for_its_own_image(real_models, appended) -> None:  # noqa: F811
    """An image query: hybrid mode matches its VQ codes against the stored ones."""
    import io

    _, memory, names = appended
    bundle = real_models.bundle
    first_new = len(memory) - len(names)
    ids = list(range(first_new, len(memory)))
    images = np.stack([np.asarray(Image.open(io.BytesIO(memory.document(i).image_bytes)))
                       for i in ids])
    vectors = bundle.clip.encode_image(images)
    codes = [memory.document(i).image_codes for i in ids]
    found = {mode: search(memory, vectors, 2, SearchStrategy(k=2, mode=mode), codes=codes)
             for mode in ("dense", "hybrid")}
    assert [row[0].id for row in found["hybrid"]] == ids
    # dense retrieval of the same images is the paper's: the codes play no part in it
    plain = search(memory, vectors, 2, SearchStrategy(k=2, mode="dense"))
    assert [[(n.id, n.score) for n in row] for row in found["dense"]] == \
        [[(n.id, n.score) for n in row] for row in plain]


# --- the service: request option, cache keys, info --------------------------------------------


def test_modes_have_distinct_cache_keys() -> None:
    rag = RetrievalStrategy("rag", True, 0.9, 32)
    assert rag.mode == "dense"
    assert rag.cache_hash() != replace(rag, mode="hybrid").cache_hash()


def test_neighbour_wire_carries_the_caption_match() -> None:
    doc = NeighbourDoc(id=3, score=0.5, caption="x", lexical_score=2.5, name_match=True)
    back = NeighbourWire.model_validate_json(NeighbourWire.from_doc(doc).model_dump_json())
    assert (back.to_doc().lexical_score, back.to_doc().name_match) == (2.5, True)
    assert NeighbourWire.from_doc(NeighbourDoc(id=1, score=0.1)).to_doc().name_match is None


def test_the_api_serves_both_modes(real_models, appended) -> None:  # noqa: F811
    memory_dir, memory, names = appended
    clip = real_models.bundle.clip
    first_new = len(memory) - len(names)
    # a name that dense retrieval misses in this paraphrase (several do)
    name, new_id = next((n, first_new + i) for i, n in enumerate(names) if first_new + i not in
                        [d.id for d in ranks(memory, clip, f"show me the flag of {n} please",
                                             "dense")])
    app = real_models.app(memory_dir=memory_dir)
    computed = r'racm3_stage_latency_seconds_count\{stage="compute_query"\} (\S+)'
    with live_app(app) as server:
        info = httpx.get(f"{server.url}/v1/info").json()
        assert info["memory"]["default_retrieval_mode"] == "hybrid"
        assert info["memory"]["retrieval_modes"] == ["dense", "hybrid"]
        assert info["memory"]["lexical"]["documents"] == len(memory)

        def retrieve(**body) -> dict:
            r = httpx.post(f"{server.url}/v1/retrieve", timeout=30,
                           json={"text": f"show me the flag of {name} please", "k": 2,
                                 **body})
            assert r.status_code == 200, r.text
            return r.json()

        def encodes() -> float:
            import re

            text = httpx.get(f"{server.url}/metrics").text
            return float(re.search(computed, text).group(1))

        start = encodes()
        default, hybrid_ = retrieve(), retrieve(mode="hybrid")
        assert default == hybrid_ and default["data"][0]["id"] == new_id
        assert default["data"][0]["name_match"] and default["data"][0]["lexical_score"] > 0
        assert encodes() - start == 1  # the same key: the second was a cache hit
        dense = retrieve(mode="dense")
        assert encodes() - start == 2  # another mode, another key: computed again
        assert new_id not in [d["id"] for d in dense["data"]]

        gen = httpx.post(f"{server.url}/v1/images/generations", timeout=120, json={
            "prompt": f"show me the flag of {name} please", "seed": 1,
            "return_neighbours": True, "retrieval": {"k": 2, "mode": "hybrid"}})
        assert gen.status_code == 200, gen.text
        assert gen.json()["neighbours"][0]["id"] == new_id

        def knn(**body) -> list:
            return httpx.post(f"{server.url}/knn-service", timeout=30, json={
                "text": f"show me the flag of {name} please", "num_images": 3, **body}).json()

        sims = [r["similarity"] for r in knn()]
        assert sims == sorted(sims, reverse=True)  # clip-retrieval's order by default
        assert knn(mode="hybrid")[0]["id"] == new_id


def test_a_bad_mode_is_a_422(real_models) -> None:  # noqa: F811
    bad = [("/v1/retrieve", {"json": {"text": "a", "mode": "sparse"}}),
           ("/v1/images/generations", {"json": {"prompt": "a", "retrieval": {"mode": "BM25"}}}),
           ("/knn-service", {"json": {"text": "a", "mode": 3}}),
           ("/v1/images/edits", {"data": {"prompt": "a", "retrieval_mode": "fused"},
                                 "files": {"image": ("a.png", b"not read", "image/png")}})]
    with live_app(real_models.app()) as server:
        for path, request in bad:
            r = httpx.post(f"{server.url}{path}", timeout=30, **request)
            assert r.status_code == 422, (path, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert "mode" in (error["param"] or "") and "dense" in error["message"], error
