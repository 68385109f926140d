"""Rerank vectors: the memory stores, for each document with an image, the CLIP vector of
its VQ-reconstructed image (what `Engine.rerank_scores` compares t2i candidates with);
neighbours carry it to the engine, over HTTP too, so reranking does not decode and
encode the retrieved images again, and the results do not change."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import httpx
import numpy as np
import pytest

from app.schemas import NeighbourWire, T2IJobWire
from model.jobs import T2IJob
from model.sampling import SamplingParams
from retrieval import publish as pub
from retrieval.manifest import MANIFEST_NAME, RERANK_FILE
from retrieval.memory import Memory
from retrieval.search import neighbours, search
from tests.live import append_documents, real_models, role_cluster  # noqa: F401 - fixture

PROMPT = "a red circle"


def recomputed(models: Any, codes: np.ndarray) -> np.ndarray:
    """What the reranker computes for these codes."""
    engine = models.engine()
    return engine.clip.encode_image(engine.decode_codes(np.asarray(codes)))


def with_images(memory: Memory, ids: list[int]) -> list[int]:
    flags = memory.has_image(np.asarray(ids))
    return [i for i, f in zip(ids, flags, strict=True) if f]


def neighbours_for(models: Any, memory: Memory, text: str, k: int = 2) -> list:
    query = models.bundle.clip.encode_text([text])
    return neighbours(memory, search(memory, query, k)[0], text)


def t2i(docs: list, seed: int = 3) -> T2IJob:
    return T2IJob(prompt=PROMPT, neighbours=docs, n=2, num_candidates=4,
                  sampling=SamplingParams(seed=seed, temperature=1.0, top_k=16))


def test_the_built_memory_stores_the_rerankers_vectors(real_models):  # noqa: F811
    memory = real_models.memory()
    assert RERANK_FILE in memory.spec.files
    assert memory.rerank_vectors.shape == (len(memory), memory.dim)
    n = len(memory)
    ids = with_images(memory, sorted({0, 1, n // 3, n // 2, n - 1}))
    assert len(ids) >= 3
    codes = np.stack([d.image_codes.reshape(memory.image_grid) for d in memory.documents(ids)])
    np.testing.assert_allclose(memory.rerank_vectors[ids], recomputed(real_models, codes),
                               atol=1e-5)
    docs = neighbours(memory, [(i, 0.5) for i in ids])
    for doc, i in zip(docs, ids, strict=True):
        np.testing.assert_array_equal(doc.image_vector, memory.rerank_vectors[i])
    assert all(d.image_vector is None for d in neighbours(memory, [(ids[0], 0.5)],
                                                          tokens=False))


def test_appended_documents_have_theirs_and_the_old_ones_are_copied(real_models,  # noqa: F811
                                                                   tmp_path):
    root = real_models.copy_memory(tmp_path / "memory")
    before = Memory.load(root)
    append_documents(real_models, root, ["the flag of Quorvia", "the flag of Zentha"],
                     ["yellow", "blue"], tmp_path / "docs")
    after = Memory.load(root)
    n = len(before)
    assert len(after) == n + 2 and after.rerank_vectors.shape == (n + 2, after.dim)
    np.testing.assert_array_equal(after.rerank_vectors[:n], before.rerank_vectors)
    codes = np.stack([d.image_codes.reshape(after.image_grid)
                      for d in after.documents([n, n + 1])])
    np.testing.assert_allclose(after.rerank_vectors[n:], recomputed(real_models, codes),
                               atol=1e-5)


def without_rerank_vectors(root) -> str:
    """The current version as an older build wrote it: no rerank file, none in its manifest."""
    vdir = pub.version_dir(root, pub.current_version(root))
    (vdir / RERANK_FILE).unlink()
    manifest = json.loads((vdir / MANIFEST_NAME).read_text())
    del manifest["files"][RERANK_FILE]
    (vdir / MANIFEST_NAME).write_text(json.dumps(manifest))
    return vdir.name


def test_an_older_memory_serves_and_an_append_to_it_computes_them(real_models,  # noqa: F811
                                                                   tmp_path):
    root = real_models.copy_memory(tmp_path / "memory")
    reference = Memory.load(root).rerank_vectors.copy()
    without_rerank_vectors(root)
    old = Memory.load(root, verify="full")
    assert old.rerank_vectors is None
    docs = neighbours_for(real_models, old, PROMPT)
    assert docs and all(d.image_vector is None for d in docs)
    append_documents(real_models, root, ["the flag of Quorvia"], ["yellow"], tmp_path / "docs")
    new = Memory.load(root)
    np.testing.assert_allclose(new.rerank_vectors[: len(old)], reference, atol=1e-5)


def test_carried_vectors_give_the_same_images_and_ranks(real_models):  # noqa: F811
    engine = real_models.engine()
    memory = real_models.memory()
    docs = neighbours_for(real_models, memory, PROMPT)
    assert docs and all(d.image_vector is not None for d in docs if d.image_codes is not None)
    bare = [replace(d, image_vector=None) for d in docs]
    carried_out = engine.text_to_image([t2i(docs)])[0]
    computed_out = engine.text_to_image([t2i(bare)])[0]
    for a, b in zip(carried_out, computed_out, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        assert a.score == pytest.approx(b.score, abs=1e-6)
    # the ranking scores themselves, on the same candidates
    images = np.stack([g.image for g in carried_out])
    codes = np.stack([g.codes for g in carried_out])
    job = t2i(docs)
    carried = engine.rerank_scores([job], images, len(images), codes)
    computed = engine.rerank_scores([replace(job, neighbours=bare)], images, len(images),
                                    codes)
    np.testing.assert_allclose(carried[1], computed[1], atol=1e-5)


def test_a_vector_of_the_wrong_size_is_recomputed(real_models):  # noqa: F811
    engine = real_models.engine()
    docs = neighbours_for(real_models, real_models.memory(), PROMPT)
    wrong = [replace(d, image_vector=np.ones(3, np.float32)) for d in docs]
    bare = [replace(d, image_vector=None) for d in docs]
    images = engine.decode_codes(np.stack([d.image_codes for d in docs]))
    a = engine.rerank_scores([t2i(wrong)], images, len(images))
    b = engine.rerank_scores([t2i(bare)], images, len(images))
    np.testing.assert_array_equal(a[1], b[1])


def test_the_vector_travels_the_wires(real_models):  # noqa: F811
    memory = real_models.memory()
    doc = neighbours_for(real_models, memory, PROMPT, k=1)[0]
    wire = NeighbourWire.model_validate_json(NeighbourWire.from_doc(doc).model_dump_json())
    np.testing.assert_array_equal(wire.to_doc().image_vector, doc.image_vector)
    job = T2IJobWire.model_validate_json(
        T2IJobWire.from_job(t2i([doc])).model_dump_json()).to_job()
    np.testing.assert_array_equal(job.neighbours[0].image_vector, doc.image_vector)
    with pytest.raises(ValueError):
        NeighbourWire(id=1, score=0.5, image_vector="AAA=")  # 2 bytes: not float32


class Recording:
    """The real engine, keeping the t2i jobs the worker hands it."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.jobs: list[T2IJob] = []

    def text_to_image(self, jobs: list[T2IJob]) -> list:
        self.jobs.extend(jobs)
        return self._engine.text_to_image(jobs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def test_multi_service_the_generator_receives_the_stored_vectors(real_models):  # noqa: F811
    engine = Recording(real_models.engine())
    memory = real_models.memory()
    with role_cluster(real_models, engine) as urls:
        r = httpx.post(f"{urls['gateway']}/v1/images/generations", timeout=120, json={
            "prompt": PROMPT, "n": 1, "num_candidates": 2, "retrieval": {"k": 2}, "seed": 5,
            "return_neighbours": True})
    assert r.status_code == 200, r.text
    got = [d for j in engine.jobs for d in j.neighbours if d.image_codes is not None]
    assert got
    for d in got:
        np.testing.assert_array_equal(d.image_vector, memory.rerank_vectors[d.id])
