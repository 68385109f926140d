"""Hybrid retrieval of image queries: the stored images' VQ codes, matched code for code.

The index tests build real memories (real FAISS, Arrow store) with the deterministic
stand-ins of tests/test_memory.py for CLIP, the tokenizer and the VQ: there, documents i
and i + 256 have the same image codes and every other pair shares none, while CLIP's
stand-in puts documents in ten clusters by i % 10. The service test runs the committed
demo bundle behind the real API, on a small memory built here from the world, appended
to through `POST /admin/documents` (the real index builder).
"""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest

from model.bundle import DEFAULT_BUNDLE
from retrieval.code_index import NO_IMAGE, CodeIndex
from retrieval.memory import Memory, Retriever
from retrieval.search import DUPLICATE_AGREEMENT, SearchStrategy, fuse_codes, search
from tests.live import RealModels, live_app, png_bytes
from tests.test_memory import GRID, build_demo_memory, doc_image, doc_vector, vq_encode


def codes_of(i: int) -> np.ndarray:
    return vq_encode(doc_image(i)[None])[0]


def image_search(memory: Memory, clip_like: int, codes: np.ndarray, mode: str, k: int = 2):
    """An image query whose CLIP vector is document `clip_like`'s, with these codes."""
    strategy = SearchStrategy(k=k, mode=mode, diversity_threshold=0.99)
    return search(memory, doc_vector(clip_like)[None], k, strategy, codes=[codes])[0]


@pytest.fixture(scope="module")
def memory_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("codes") / "memory"
    build_demo_memory(root, 500)
    return root


# --- the index -----------------------------------------------------------------------------


def test_the_code_index_holds_every_stored_image_and_no_image_for_the_rest(memory_dir) -> None:
    memory = Memory.load(memory_dir)
    index = memory.codes
    assert isinstance(index, CodeIndex) and index.codes.shape == (500, GRID[0] * GRID[1])
    for i in (0, 1, 3, 77, 499):  # i % 4 == 2 has no image
        np.testing.assert_array_equal(index.codes[i], memory.document(i).image_codes)
    assert (index.codes[2] == NO_IMAGE).all() and (index.codes[498] == NO_IMAGE).all()
    agreement, ids = index.search([codes_of(77), None], 4)
    assert ids[0, :2].tolist() == [77, 333]  # the two documents with these codes, by id
    assert agreement[0, :2].tolist() == [1.0, 1.0]
    assert (ids[0, 2:] == -1).all()  # nothing else shares a single code with them
    assert (ids[1] == -1).all()  # no image, no candidates
    np.testing.assert_allclose(index.agreement(codes_of(77), np.array([77, 78, 2])),
                               [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="codes"):
        index.search([np.zeros(5, np.int64)], 1)


def test_a_hybrid_image_query_finds_its_image_where_clip_looks_elsewhere(memory_dir) -> None:
    memory = Memory.load(memory_dir)
    # CLIP's stand-in places the query in document 5's cluster; its codes are document 77's
    dense = image_search(memory, 5, codes_of(77), "dense")
    hybrid = image_search(memory, 5, codes_of(77), "hybrid")
    assert not {77, 333} & {n.id for n in dense}
    assert {n.id for n in hybrid} == {77, 333}
    # the score is still the CLIP similarity, and CLIP orders images that agree alike
    assert hybrid[0].score >= hybrid[1].score
    assert hybrid[0].score == pytest.approx(float(doc_vector(hybrid[0].id) @ doc_vector(5)),
                                            abs=1e-5)
    # without codes, or with the code match turned off, a hybrid image query is dense
    strategy = SearchStrategy(k=2, mode="hybrid", diversity_threshold=0.99)
    assert [n.id for n in search(memory, doc_vector(5)[None], 2, strategy)[0]] == \
        [n.id for n in dense]
    off = replace(strategy, image_codes=False)
    assert [n.id for n in search(memory, doc_vector(5)[None], 2, off, codes=[codes_of(77)])[0]] \
        == [n.id for n in dense]


def test_a_stored_copy_of_the_query_image_outranks_a_look_alike_clip_prefers() -> None:
    # an appended flag under a name CLIP never learned scores low against its own image;
    # a world flag that looks much like it (91% of codes) scores high
    query = np.array([1.0, 0.0], np.float32)
    vectors = {1: [0.7, 0.714], 2: [0.9, 0.436], 3: [0.95, 0.312]}
    agreement = {1: 1.0, 2: 0.91, 3: 0.1}

    def ranked(duplicates: float | None) -> list[int]:
        ids, dense = fuse_codes(
            query, np.array([3, 2, -1]), np.array([1, 2, 3]),
            lambda ids: np.array([vectors[int(i)] for i in ids], np.float32),
            lambda ids: np.array([agreement[int(i)] for i in ids], np.float32), 1.0,
            duplicates)
        np.testing.assert_allclose(dense, [vectors[int(i)][0] for i in ids], rtol=1e-6)
        return ids.tolist()

    assert ranked(DUPLICATE_AGREEMENT) == [1, 2, 3]
    assert ranked(None) == [2, 1, 3]  # CLIP + agreement alone: 1.81 against 1.70


def test_an_appended_image_is_retrieved_first_for_itself_after_reload(tmp_path: Path) -> None:
    build_demo_memory(tmp_path, 300)
    retriever = Retriever(tmp_path)
    # document 313 (appended below) has the codes of 57 = 313 - 256 and of no other
    before = retriever.search(doc_vector(1)[None], 2, SearchStrategy(k=2, mode="hybrid"),
                              codes=[codes_of(313)])[0]
    assert before[0].id == 57
    build_demo_memory(tmp_path, 20, start=300, append=True)
    retriever.reload()
    after = retriever.search(doc_vector(1)[None], 2, SearchStrategy(k=2, mode="hybrid"),
                             codes=[codes_of(313)])[0]
    assert {n.id for n in after} == {57, 313}
    assert len(retriever.memory.codes) == 320


# --- through the API, on the demo bundle ----------------------------------------------------

KEY = "image-query-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.skipif(not (DEFAULT_BUNDLE / "ra_cm3.safetensors").is_file(),
                    reason="demo bundle not committed")
def test_a_caption_names_an_appended_flag_with_the_api_defaults(tmp_path: Path) -> None:
    import world.source  # noqa: F401 - registers `--source world`
    from model.bundle import Bundle
    from retrieval.from_bundle import build_from_bundle
    from world import World, WorldConfig
    from world.novel_flags import novel_flags

    bundle = Bundle(DEFAULT_BUNDLE)
    memory_dir = tmp_path / "memory"
    build_from_bundle(bundle, "world", "memory", memory_dir, limit=100, progress=False)
    world = World(WorldConfig.from_dict(bundle.manifest["world"]))
    flags = novel_flags(world, 3, seed=5)  # layouts and names the world never makes
    models = RealModels(DEFAULT_BUNDLE, memory_dir)
    app = models.app(gateway={"api_keys": [KEY]}, generator={"max_wait_ms": 2})
    with live_app(app) as server:
        added = httpx.post(
            f"{server.url}/admin/documents", headers=AUTH, timeout=300,
            files=[("image", (f"{f.name}.png", png_bytes(f.image), "image/png")) for f in flags],
            data={"caption": [f"{f.name}'s national flag" for f in flags]})
        assert added.status_code == 200, added.text
        ids = added.json()["ids"]
        for flag, doc_id in zip(flags, ids, strict=True):
            image = base64.b64encode(png_bytes(flag.image)).decode()
            r = httpx.post(f"{server.url}/v1/images/captions", headers=AUTH, timeout=120,
                           json={"image": image, "seed": 3, "return_neighbours": True})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["neighbours"][0]["id"] == doc_id, (flag.name, body["neighbours"])
            assert flag.name.lower() in body["data"][0]["text"].lower(), (flag.name, body)
