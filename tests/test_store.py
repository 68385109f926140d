"""The document store (Arrow IPC, memory-mapped) and the embeddings file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.store import (
    DocumentStore,
    EmbeddingsWriter,
    StoreWriter,
    open_embeddings,
)


def _row(i: int) -> dict:
    """Row i of a made-up collection: every third has no image, every fifth no caption."""
    has_image, has_text = i % 3 != 0, i % 5 != 0 or i % 3 == 0
    return {
        "caption": f"caption {i}" if has_text else None,
        "image": f"png-{i}".encode() if has_image else None,
        "text_ids": [i, i + 1, i + 2] if has_text else None,
        "image_codes": np.arange(16).reshape(4, 4) + i if has_image else None,
        "source": f"src/{i}",
    }


def _write(path: Path, n: int, batch_rows: int = 100) -> None:
    with StoreWriter(path, batch_rows=batch_rows) as w:
        assert w.append(_row(i) for i in range(n)) == list(range(n))


def _check(doc, i: int) -> None:
    want = _row(i)
    assert doc.id == i
    assert doc.caption == want["caption"]
    assert doc.text_ids == want["text_ids"]
    assert doc.source == want["source"]
    assert doc.has_image == (want["image"] is not None)
    if want["image_codes"] is None:
        assert doc.image_codes is None
    else:
        np.testing.assert_array_equal(doc.image_codes, want["image_codes"].reshape(-1))


def test_random_access_returns_the_right_rows(tmp_path: Path) -> None:
    path = tmp_path / "store.arrow"
    _write(path, 1050)  # 10 full batches and a partial one
    store = DocumentStore.open(path)
    assert len(store) == 1050

    ids = np.random.default_rng(0).permutation(1050)[:300].tolist() + [7, 7, 1049, 0]
    docs = store.get(ids)
    for doc, i in zip(docs, ids, strict=True):
        _check(doc, i)
        assert doc.image_bytes is None  # only read when asked for
    with_images = store.get([4, 3], with_image=True)
    assert [d.image_bytes for d in with_images] == [b"png-4", None]
    assert store.image_bytes(5) == b"png-5"


def test_out_of_range_ids_raise(tmp_path: Path) -> None:
    _write(tmp_path / "s.arrow", 10)
    store = DocumentStore.open(tmp_path / "s.arrow")
    for bad in (-1, 10):
        with pytest.raises(IndexError, match="outside the store"):
            store.get([bad])


def test_modality_flags_follow_the_rows(tmp_path: Path) -> None:
    _write(tmp_path / "s.arrow", 250)
    has_image, has_text = DocumentStore.open(tmp_path / "s.arrow").modality_flags()
    assert has_image.tolist() == [_row(i)["image"] is not None for i in range(250)]
    assert has_text.tolist() == [_row(i)["caption"] is not None for i in range(250)]


def test_copy_keeps_ids_and_appends_after_them(tmp_path: Path) -> None:
    old_path, new_path = tmp_path / "old.arrow", tmp_path / "new.arrow"
    _write(old_path, 250)  # last batch partial: its rows must start the next full batch
    with StoreWriter(new_path, batch_rows=100) as w:
        w.copy_from(DocumentStore.open(old_path))
        assert w.append(_row(i) for i in range(250, 420)) == list(range(250, 420))
    store = DocumentStore.open(new_path)
    assert len(store) == 420
    assert [b.num_rows for b in store.batches()] == [100, 100, 100, 100, 20]
    for doc in store.get(range(420)):
        _check(doc, doc.id)


def test_copy_must_come_first(tmp_path: Path) -> None:
    _write(tmp_path / "old.arrow", 5)
    with StoreWriter(tmp_path / "new.arrow") as w:
        w.append([_row(0)])
        with pytest.raises(ValueError, match="before any append"):
            w.copy_from(DocumentStore.open(tmp_path / "old.arrow"))


def test_codes_outside_int16_are_refused_with_a_hint(tmp_path: Path) -> None:
    with StoreWriter(tmp_path / "s.arrow") as w:
        with pytest.raises(ValueError, match="int32"):
            w.append([{"image_codes": [40_000], "source": "x"}])
    with StoreWriter(tmp_path / "wide.arrow", code_type="int32") as w:
        w.append([{"image_codes": [40_000], "source": "x"}])
    assert DocumentStore.open(tmp_path / "wide.arrow").get([0])[0].image_codes.tolist() == [
        40_000]


def test_embeddings_stream_to_a_memmappable_npy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 24)).astype(np.float32) for n in (5, 0, 300, 1)]
    with EmbeddingsWriter(tmp_path / "e.npy", 24) as w:
        for p in parts:
            w.append(p)
    emb = open_embeddings(tmp_path / "e.npy")
    assert isinstance(emb, np.memmap) and emb.shape == (306, 24)
    np.testing.assert_array_equal(emb, np.concatenate(parts))
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), np.concatenate(parts))

    with EmbeddingsWriter(tmp_path / "f.npy", 24) as w:
        w.copy_from(emb, chunk_rows=100)
        w.append(parts[0])
    np.testing.assert_array_equal(open_embeddings(tmp_path / "f.npy"),
                                  np.concatenate([*parts, parts[0]]))
    with pytest.raises(ValueError, match=r"\(N, 24\)"):
        EmbeddingsWriter(tmp_path / "g.npy", 24).append(np.zeros((2, 23), np.float32))
