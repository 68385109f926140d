"""Building, publishing, verifying, loading and swapping memory versions (real files,
real FAISS). The CLIP / tokenizer / VQ stand-ins are deterministic functions of the
document, so the tests need no trained model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.retriever.memory import Memory, MemoryLoadError, Retriever
from app.retriever.search import SearchStrategy, search
from index_builder import publish as pub
from index_builder.build import build_memory
from index_builder.lexical_index import LEXICAL_FILES
from index_builder.manifest import MANIFEST_NAME, STORE_FILE
from index_builder.sources import SkipReport, SourceItem

DIM = 32
GRID = (4, 4)
N_CLUSTERS = 10
REPO = Path(__file__).resolve().parents[1]


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def doc_vector(i: int) -> np.ndarray:
    """Documents in 10 clusters; members of a cluster have cosine ~0.8 (< 0.9)."""
    centers = unit(np.random.default_rng(123).standard_normal((N_CLUSTERS, DIM)))
    noise = unit(np.random.default_rng(i).standard_normal(DIM))
    return unit(centers[i % N_CLUSTERS] + 0.5 * noise)


def doc_image(i: int) -> np.ndarray:
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0], image[..., 1] = i % 256, i // 256  # the pixels carry the id
    return image


def doc_items(start: int, stop: int) -> Iterator[SourceItem]:
    """Doc i has a caption unless i % 4 == 3 and an image unless i % 4 == 2."""
    for i in range(start, stop):
        yield SourceItem(image=doc_image(i) if i % 4 != 2 else None, image_bytes=None,
                         caption=f"doc {i} of cluster {i % N_CLUSTERS}" if i % 4 != 3
                         else None, source=f"test:{i}")


def doc_id(caption: str | None, image: np.ndarray | None) -> int:
    if caption is not None:
        return int(caption.split()[1])
    return int(image[0, 0, 0]) + 256 * int(image[0, 0, 1])


class Embedder:
    """A stand-in for ClipEncoder.embed_documents that records what it embedded."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls = 0
        self.seen: list[int] = []
        self.fail_on_call = fail_on_call

    def __call__(self, captions, images) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("embedding failed mid-build")
        ids = [doc_id(c, im) for c, im in zip(captions, images, strict=True)]
        self.seen += ids
        return np.stack([doc_vector(i) for i in ids])


def tokenize(text: str) -> list[int]:
    return [ord(c) for c in text]


def vq_encode(images: np.ndarray) -> np.ndarray:
    assert images.dtype == np.uint8 and images.ndim == 4
    return (images[:, :4, :4, 0].astype(np.int64) + np.arange(16).reshape(GRID)) % 512


COMPONENTS = {"clip": "test-clip", "vq": "test-vq", "tokenizer": "test-bpe"}


def build_demo_memory(root: Path, n: int, start: int = 0, append: bool = False,
                      embedder: Embedder | None = None, **kwargs):
    return build_memory(doc_items(start, start + n), root, embed=embedder or Embedder(),
                        tokenize_text=tokenize, encode_images=vq_encode, append=append,
                        ids=COMPONENTS, progress=False, chunk_size=64, **kwargs)


# --- layout, manifest, loading ----------------------------------------------------------


def test_build_publishes_a_complete_verified_version(tmp_path: Path) -> None:
    report = SkipReport()

    def source() -> Iterator[SourceItem]:  # like a reader: it counts skips as it streams
        yield from doc_items(0, 50)
        report.skip("unreadable", "x.png")
        yield from doc_items(50, 100)
        yield SourceItem(None, None, "  ", "test:empty")

    result = build_memory(source(), tmp_path, embed=Embedder(), tokenize_text=tokenize,
                          encode_images=vq_encode, ids=COMPONENTS, progress=False,
                          skip_report=report, chunk_size=32)
    assert (result.version, result.documents, result.added) == ("v000001", 100, 100)
    assert (tmp_path / "CURRENT").read_text().strip() == "v000001"
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["v000001"]

    raw = json.loads((tmp_path / "versions/v000001" / MANIFEST_NAME).read_text())
    assert list(raw)[-1] == "complete" and raw["complete"] is True
    assert raw["components"] == COMPONENTS and raw["parent"] is None
    assert raw["counts"]["documents"] == 100
    assert raw["counts"]["with_image"] == 75 and raw["counts"]["with_text"] == 75
    assert raw["counts"]["skipped"] == {"unreadable": 1, "empty": 1}
    assert raw["index"]["factory"] == "Flat" and raw["index"]["mmap_mode"] == "mmap"
    assert raw["embedding_dim"] == DIM and raw["image_grid"] == list(GRID)
    assert set(raw["files"]) == {"index.faiss", "store.arrow", "embeddings.npy",
                                 *LEXICAL_FILES}
    assert all(len(e["sha256"]) == 64 for e in raw["files"].values())

    memory = Memory.load(tmp_path, verify="full")
    assert (memory.version, len(memory), memory.dim, memory.image_grid) == ("v000001", 100,
                                                                            DIM, GRID)
    doc = memory.document(5)
    assert doc.caption == "doc 5 of cluster 5" and doc.text_ids == tokenize(doc.caption)
    np.testing.assert_array_equal(doc.image_codes, vq_encode(doc_image(5)[None])[0].ravel())
    assert doc.image_bytes.startswith(b"\x89PNG")  # the build encoded the image
    np.testing.assert_allclose(memory.embeddings[5], doc_vector(5), atol=1e-6)
    text_only, image_only = memory.documents([6, 7], with_image=False)
    assert text_only.image_codes is None and not text_only.has_image and text_only.has_text
    assert image_only.caption is None and image_only.text_ids is None and image_only.has_image


def test_no_memory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MemoryLoadError, match="no CURRENT pointer"):
        Memory.load(tmp_path)


@pytest.fixture()
def two_versions(tmp_path: Path) -> Path:
    build_demo_memory(tmp_path, 120)
    build_demo_memory(tmp_path, 40, start=120, append=True)
    return tmp_path


@pytest.mark.parametrize("name", ["index.faiss", "store.arrow", "embeddings.npy"])
def test_a_corrupt_file_is_refused_by_name(two_versions: Path, name: str) -> None:
    path = two_versions / "versions/v000002" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle
    path.write_bytes(bytes(data))
    with pytest.raises(MemoryLoadError, match=rf"{name} is corrupt: its sha256 differs"):
        Memory.load(two_versions)
    assert Memory.load(two_versions, "v000001").version == "v000001"  # others still load


def test_a_truncated_file_is_refused_even_by_the_fast_check(two_versions: Path) -> None:
    path = two_versions / "versions/v000002" / STORE_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MemoryLoadError, match=r"store\.arrow has \d+ bytes, the manifest"):
        Memory.load(two_versions, verify="fast")


def test_the_fast_check_reads_only_the_edges(two_versions: Path) -> None:
    vdir = two_versions / "versions/v000002"
    path = vdir / "embeddings.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # in the last MiB: caught
    path.write_bytes(bytes(data))
    with pytest.raises(MemoryLoadError, match="first/last MiB"):
        Memory.load(two_versions, verify="fast")


def test_a_version_without_complete_is_refused(two_versions: Path) -> None:
    path = two_versions / "versions/v000002" / MANIFEST_NAME
    raw = json.loads(path.read_text())
    del raw["complete"]
    path.write_text(json.dumps(raw))
    with pytest.raises(MemoryLoadError, match="not marked complete"):
        Memory.load(two_versions)
    path.unlink()
    with pytest.raises(MemoryLoadError, match="manifest.json is missing"):
        Memory.load(two_versions)


# --- killed builds ---------------------------------------------------------------------


def test_a_build_failing_midway_leaves_the_old_version_served(tmp_path: Path) -> None:
    build_demo_memory(tmp_path, 100)
    with pytest.raises(RuntimeError, match="mid-build"):
        build_demo_memory(tmp_path, 500, start=100, embedder=Embedder(fail_on_call=4))
    assert pub.current_version(tmp_path) == "v000001"
    assert [p.name for p in (tmp_path / "versions").iterdir()] == ["v000001"]  # cleaned up
    assert len(Memory.load(tmp_path)) == 100


_KILLED_BUILD = """
import os, signal, sys
from tests.test_memory import build_demo_memory
import tests.test_memory as t

original = t.doc_items

def dying_items(start, stop):
    for n, item in enumerate(original(start, stop)):
        if n == 200:  # three chunks written, the store and vectors half-done
            os.kill(os.getpid(), signal.SIGKILL)
        yield item

t.doc_items = dying_items
build_demo_memory(sys.argv[1], 400, start=100, append=True)
"""


def test_a_build_killed_by_sigkill_leaves_the_old_version_served(tmp_path: Path) -> None:
    build_demo_memory(tmp_path, 100)
    proc = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(tmp_path)], cwd=REPO,
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]

    staging = [p for p in (tmp_path / "versions").iterdir() if p.name.startswith(".tmp-")]
    assert len(staging) == 1 and (staging[0] / STORE_FILE).exists()  # the half build
    assert pub.current_version(tmp_path) == "v000001"
    assert pub.list_versions(tmp_path) == ["v000001"]
    memory = Memory.load(tmp_path)
    assert (memory.version, len(memory)) == ("v000001", 100)

    assert pub.clean_staging(tmp_path, older_than_s=0) == staging
    assert build_demo_memory(tmp_path, 10, start=100, append=True).version == "v000002"


# --- append ----------------------------------------------------------------------------


def test_append_finds_new_documents_keeps_old_ids_and_embeds_only_new(tmp_path: Path) -> None:
    first = build_demo_memory(tmp_path, 150)
    before = Memory.load(tmp_path)
    embedder = Embedder()
    result = build_demo_memory(tmp_path, 70, start=150, append=True, embedder=embedder)

    assert (result.version, result.documents, result.added) == ("v000002", 220, 70)
    assert sorted(embedder.seen) == list(range(150, 220))  # nothing old was re-embedded
    assert embedder.calls == result.embed_calls == 2  # 70 new docs in chunks of 64
    after = Memory.load(tmp_path)
    assert after.spec.parent == "v000001" and after.spec.components == COMPONENTS
    for old, new in zip(before.documents(list(range(150))), after.documents(list(range(150))),
                        strict=True):
        assert (old.id, old.caption, old.text_ids, old.source) == (new.id, new.caption,
                                                                   new.text_ids, new.source)
    np.testing.assert_array_equal(after.embeddings[:150], before.embeddings[:])
    knn = SearchStrategy.knn(1)
    for i in (0, 149, 150, 219):  # old and new documents are found by their own vectors
        assert search(after, doc_vector(i)[None], 1, knn)[0][0].id == i
    assert first.version == "v000001" and Memory.load(tmp_path, "v000001").version == "v000001"


def test_append_with_other_models_is_refused(tmp_path: Path) -> None:
    build_demo_memory(tmp_path, 20)
    with pytest.raises(ValueError, match="not comparable"):
        build_memory(doc_items(20, 30), tmp_path, embed=Embedder(), tokenize_text=tokenize,
                     encode_images=vq_encode, append=True, ids={"clip": "other"},
                     progress=False)
    with pytest.raises(ValueError, match="needs an existing memory"):
        build_demo_memory(tmp_path / "empty", 5, append=True)


# --- serving: atomic reload ------------------------------------------------------------


def test_reload_swaps_atomically_and_keeps_serving_on_a_bad_version(tmp_path: Path) -> None:
    build_demo_memory(tmp_path, 100)
    retriever = Retriever(tmp_path)
    old = retriever.memory
    query = doc_vector(130)[None]
    stop, errors, seen = threading.Event(), [], set()

    def hammer() -> None:
        while not stop.is_set():
            memory = retriever.memory  # one snapshot per request
            try:
                hit = search(memory, query, 1, SearchStrategy.knn(1))[0][0]
                assert hit.id < len(memory)
                seen.add((memory.version, hit.id == 130))
            except Exception as e:  # noqa: BLE001 - collected, asserted below
                errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    build_demo_memory(tmp_path, 50, start=100, append=True)
    assert retriever.reload().version == "v000002"
    deadline = time.monotonic() + 30
    while ("v000002", True) not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert ("v000002", True) in seen and ("v000001", True) not in seen

    # a search holding the old object still works after the swap
    assert search(old, query, 1, SearchStrategy.knn(1))[0][0].id < 100
    assert retriever.reload() is retriever.memory  # CURRENT unchanged: nothing to do

    build_demo_memory(tmp_path, 10, start=150, append=True)
    store = tmp_path / "versions/v000003" / STORE_FILE
    store.write_bytes(store.read_bytes()[:-10])
    with pytest.raises(MemoryLoadError, match="store.arrow"):
        retriever.reload()
    assert retriever.version == "v000002"  # the old version keeps serving


def test_publish_refuses_an_incomplete_staging_dir(tmp_path: Path) -> None:
    staging = pub.new_staging_dir(tmp_path)
    (staging / MANIFEST_NAME).write_text(json.dumps({"version": "v000001"}))
    with pytest.raises(pub.PublishError, match="not marked complete"):
        pub.publish(tmp_path, staging)
    assert pub.current_version(tmp_path) is None and os.path.isdir(staging)
