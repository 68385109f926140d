"""The training-time neighbour table, and the token corpus the generator trains on.

RA-CM3 retrieves for a training document with a query made from *one part* of it, the
text or the image, never the whole document, with ~20% of the query's tokens dropped
(query dropout), so the model learns to use neighbours that are related but not copies.
The document itself is excluded (here the memory and the training split are disjoint by
construction, and the diversity rule also skips anything too similar to the query).

`neighbours[i, v, :]` holds the memory ids for training document i under query variant
v: v = 0 is the text query, v = 1 the image query.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from training.train_generator import TrainingCorpus

TEXT_QUERY, IMAGE_QUERY = 0, 1
PATCH = 4  # image query dropout works on 4x4 patches: the VQ's unit of an image token


def drop_words(caption: str, p: float, rng: np.random.Generator) -> str:
    """Text query dropout: drop ~p of the words, always keeping at least one."""
    words = caption.split()
    keep = rng.random(len(words)) >= p
    if not keep.any():
        keep[rng.integers(len(words))] = True
    return " ".join(w for w, k in zip(words, keep, strict=True) if k)


def drop_patches(image: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Image query dropout: grey out ~p of the 4x4 patches (the image's tokens)."""
    h, w = image.shape[0] // PATCH, image.shape[1] // PATCH
    drop = rng.random((h, w)) < p
    out = image.copy()
    cells = np.kron(drop, np.ones((PATCH, PATCH), dtype=bool))
    out[cells] = 128
    return out


def build_neighbour_table(world, bundle, memory_dir: str | Path, n_docs: int, k: int = 2,
                          diversity: float = 0.9, dropout: float = 0.2, seed: int = 0,
                          batch: int = 512, progress: bool = True) -> np.ndarray:
    """(n_docs, 2, k) memory ids per training document and query variant (-1 = none)."""
    from retrieval.memory import Memory
    from retrieval.search import SearchStrategy, search

    memory = Memory.load(memory_dir)
    clip = bundle.clip
    rng = np.random.default_rng([seed, 7])
    n_docs = min(n_docs, world.split_size("train"))
    table = np.full((n_docs, 2, k), -1, dtype=np.int64)
    strategy = SearchStrategy(k=k, diversity_threshold=diversity)
    bar = tqdm(total=n_docs, desc="neighbours", disable=not progress)
    for start in range(0, n_docs, batch):
        items = list(world.iter_split("train", start, min(start + batch, n_docs)))
        texts = [drop_words(it.caption, dropout, rng) for it in items]
        images = np.stack([drop_patches(it.image, dropout, rng) for it in items])
        for variant, vecs in ((TEXT_QUERY, clip.encode_text(texts)),
                              (IMAGE_QUERY, clip.encode_image(images))):
            for row, hits in enumerate(search(memory, vecs, k, strategy)):
                ids = [h.id for h in hits][:k]
                table[start + row, variant, : len(ids)] = ids
        bar.update(len(items))
    bar.close()
    return table


def memory_doc_ids(memory: Any, space, n: int | None = None) -> list[list[int]]:
    """Token ids of every memory document, in id order."""
    n = len(memory) if n is None else n
    return [space.document_ids(d.text_ids, d.image_codes)
            for d in memory.store.get(list(range(n)))]


def load_corpus(world, bundle, memory_dir: str | Path, table: np.ndarray,
                batch: int = 1024) -> TrainingCorpus:
    """Token ids of the training documents (first `len(table)`) and of the whole memory."""
    from model.tokens import Document
    from retrieval.memory import Memory

    space, tok, vq = bundle.space, bundle.tokenizer, bundle.vq
    main: list[list[int]] = []
    for start in range(0, len(table), batch):
        items = list(world.iter_split("train", start, min(start + batch, len(table))))
        codes = vq.encode_images([it.image for it in items])
        for it, c in zip(items, codes, strict=True):
            main.append(Document(it.caption, c).to_ids(space, tok.encode))
    memory = Memory.load(memory_dir)
    return TrainingCorpus(main, memory_doc_ids(memory, space), table, tuple(space.image_grid))
