"""The streaming memory build: documents -> embeddings + tokens -> store + FAISS index.

Documents arrive as a stream and are processed in chunks: each chunk is embedded with
CLIP, its captions BPE-tokenised and its images VQ-encoded; its rows go to the Arrow
store and its vectors to an on-disk float32 `.npy`. Images never accumulate in RAM, so a
million documents build in a few hundred MB (the vectors, 2 GB at 1M x 512, stay on
disk). The index is built from the on-disk vectors at the end, then the lexical (BM25)
index from the store's captions, the manifest written last, and the version published
atomically (retrieval/publish.py).

`append=True` copies the current version's store batches and vectors as they are
(nothing old is re-embedded), adds the new documents after them (ids continue), and
rebuilds both indexes (FAISS from the vectors, the lexical one from the captions), as a
new version whose manifest names its parent.

With `image_vectors`, each document with an image also gets the CLIP vector of its
VQ-reconstructed image (`rerank_vectors.npy`): what the t2i reranker compares its
candidates with, stored so that serving does not decode and encode every neighbour
again. An append copies the parent's (or computes them from the parent's stored codes,
for a parent built without them).
The parent is verified first: every file against its full checksum, the parts' sizes
against each other, and every copied row against the models' ranges (image codes inside
the VQ codebook and the grid, text ids inside the vocabulary). The new version's own
checksums would otherwise vouch for whatever damage it copied.
"""

from __future__ import annotations

import io
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from retrieval import publish as pub
from retrieval.faiss_index import IndexInfo, build_index, read_index, write_index
from retrieval.lexical_index import LexicalIndex
from retrieval.manifest import (
    DATA_FILES,
    EMBEDDINGS_FILE,
    INDEX_FILE,
    RERANK_FILE,
    STORE_FILE,
    Manifest,
    ManifestError,
    file_entry,
    read_manifest,
    verify_file,
    write_manifest,
)
from retrieval.sources import SkipReport, SourceItem
from retrieval.store import (
    DocumentStore,
    EmbeddingsWriter,
    RowBounds,
    StoreError,
    StoreWriter,
    open_embeddings,
)

log = logging.getLogger(__name__)

# embed(captions, images) -> (B, D) normalised document vectors (ClipEncoder.embed_documents)
Embed = Callable[[list[str | None], list[np.ndarray | None]], np.ndarray]
TokenizeText = Callable[[str], list[int]]  # TextTokenizer.encode
EncodeImages = Callable[[np.ndarray], np.ndarray]  # uint8 (B, H, W, 3) -> codes (B, h, w)
# codes (B, h, w) -> (B, D) normalised CLIP image vectors of their VQ reconstructions
ImageVectors = Callable[[np.ndarray], np.ndarray]


class BuildError(ValueError):
    """A build that cannot go ahead, for a reason its message tells the user."""


class AppendRefused(BuildError):
    """The version to append to is damaged: nothing was published, CURRENT is unchanged."""


@dataclass
class BuildReport:
    version: str
    version_dir: Path
    documents: int  # in the new version
    added: int  # by this build
    skipped: dict[str, int]  # by reason, source and build together
    index: dict[str, Any]  # IndexInfo
    embed_calls: int
    wall_s: float


@dataclass
class _Counts:
    with_image: int = 0
    with_text: int = 0


def build_memory(
    items: Iterable[SourceItem],
    out_dir: str | Path,
    *,
    embed: Embed,
    tokenize_text: TokenizeText,
    encode_images: EncodeImages,
    index_type: str = "auto",
    chunk_size: int = 256,
    append: bool = False,
    ids: Mapping[str, str] | None = None,
    progress: bool = True,
    skip_report: SkipReport | None = None,
    code_type: str = "int16",
    codebook_size: int | None = None,
    text_vocab_size: int | None = None,
    image_vectors: ImageVectors | None = None,
) -> BuildReport:
    """Build a new version of the memory at `out_dir` from `items` and publish it.

    `ids` names the models (clip, vq, tokenizer, bundle…) for the manifest; appending
    with different ids is refused, since old and new vectors would not be comparable.
    `codebook_size` and `text_vocab_size` (the VQ's and the BPE's) bound the rows an
    append copies from its parent; a damaged parent raises AppendRefused.
    `image_vectors` (codes -> CLIP vectors of their reconstructions) adds the reranker's
    vectors of the documents' images (`RERANK_FILE`); without it the version has none.
    On any error the staging directory is removed and CURRENT is untouched.
    """
    t0 = time.perf_counter()
    memory = Path(out_dir)
    memory.mkdir(parents=True, exist_ok=True)
    parent = _parent_version(memory, dict(ids or {})) if append else None
    bounds = RowBounds(codebook_size=codebook_size, text_vocab_size=text_vocab_size)
    staging = pub.new_staging_dir(memory)
    try:
        return _build(items, memory, staging, parent, embed=embed, tokenize_text=tokenize_text,
                      encode_images=encode_images, index_type=index_type,
                      chunk_size=chunk_size, ids=dict(ids or {}), progress=progress,
                      skip_report=skip_report, code_type=code_type, bounds=bounds, t0=t0,
                      image_vectors=image_vectors)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _parent_version(memory: Path, ids: dict[str, str]) -> tuple[str, Manifest]:
    try:
        version = pub.current_version(memory)
    except pub.PublishError as e:
        raise AppendRefused(f"cannot append to {memory}: {e}; point CURRENT at an intact "
                            "version first (`retrieval.publish.set_current`)") from e
    if version is None:
        raise BuildError(f"--append needs an existing memory at {memory}; build one first")
    vdir = pub.version_dir(memory, version)
    try:
        manifest = read_manifest(vdir)
    except ManifestError as e:
        raise _refused(memory, version, str(e)) from e
    if ids and manifest.components and manifest.components != ids:
        raise BuildError(
            f"{memory} {version} was built with {manifest.components}, not {ids}: vectors "
            "from other models are not comparable; rebuild instead of appending")
    _verify_parent(memory, version, vdir, manifest)
    return version, manifest


def _verify_parent(memory: Path, version: str, vdir: Path, manifest: Manifest) -> None:
    """Every file against its full checksum, and the parts' sizes against each other."""
    try:
        for name in DATA_FILES:
            entry = manifest.files.get(name)
            if entry is None:
                raise ManifestError(f"the manifest does not list {name}")
            verify_file(vdir / name, entry, full=True)
        if RERANK_FILE in manifest.files:
            verify_file(vdir / RERANK_FILE, manifest.files[RERANK_FILE], full=True)
            rerank = open_embeddings(vdir / RERANK_FILE)
            if rerank.shape != (manifest.counts.get("documents", -1), manifest.embedding_dim):
                raise ManifestError(f"{RERANK_FILE} holds {rerank.shape}, not one "
                                    f"{manifest.embedding_dim}-vector per document")
        store = DocumentStore.open(vdir / STORE_FILE)
        stored = len(store)
        store.close()
        vectors = open_embeddings(vdir / EMBEDDINGS_FILE)
    except (ManifestError, OSError, ValueError) as e:  # Arrow and numpy: ValueError kinds
        raise _refused(memory, version, str(e)) from e
    sizes = {"store": stored, "embeddings": len(vectors),
             "manifest": int(manifest.counts.get("documents", -1))}
    if len(set(sizes.values())) != 1 or vectors.shape[1] != manifest.embedding_dim:
        raise _refused(memory, version, f"its parts disagree: {sizes}, embedding dim "
                                        f"{vectors.shape[1]} vs {manifest.embedding_dim}")


def _refused(memory: Path, version: str, problem: str) -> AppendRefused:
    return AppendRefused(
        f"refusing to append to {memory} {version}, which is damaged: {problem}. Nothing "
        f"was published and CURRENT still names {version}. Rebuild the memory from its "
        "sources (build-index without --append), or point CURRENT at an intact version.")


@dataclass
class _Staged:
    """What the build has written to the staging directory so far."""

    store: StoreWriter
    vectors: EmbeddingsWriter | None = None
    image_vectors: ImageVectors | None = None  # None: this version stores no rerank vectors
    rerank: EmbeddingsWriter | None = None  # RERANK_FILE, opened with `vectors`
    counts: _Counts = field(default_factory=_Counts)
    grid: tuple[int, int] | None = None
    embed_calls: int = 0
    first_new: int = 0  # the id of the first document this build adds


def _build(items: Iterable[SourceItem], memory: Path, staging: Path,
           parent: tuple[str, Manifest] | None, *, embed: Embed, tokenize_text: TokenizeText,
           encode_images: EncodeImages, index_type: str, chunk_size: int, ids: dict[str, str],
           progress: bool, skip_report: SkipReport | None, code_type: str,
           bounds: RowBounds, t0: float, image_vectors: ImageVectors | None) -> BuildReport:
    skipped: Counter[str] = Counter()  # by this pipeline; the source's are merged at the end
    staged = _Staged(StoreWriter(staging / STORE_FILE, code_type=code_type),
                     image_vectors=image_vectors)
    if parent:
        _copy_parent(memory, staging, parent, staged, bounds)
    staged.first_new = staged.store.count
    bar = tqdm(desc="build-index", unit="doc", disable=not progress)
    for chunk in _chunks(items, chunk_size):
        _add_chunk(chunk, staged, staging, skipped, embed, tokenize_text, encode_images)
        bar.update(len(chunk))
    bar.close()
    store = staged.store
    store.close()
    if staged.vectors is None or store.count == 0:
        raise BuildError("no documents to build a memory from: every item was skipped "
                         f"({dict(skipped) or 'the source was empty'})")
    staged.vectors.close()
    if staged.rerank is not None:
        staged.rerank.close()
    if skip_report:  # a streaming source counts its skips while it is read
        skipped.update(skip_report.skipped)
    if index_type == "auto" and parent:  # an appended memory keeps the family asked for
        index_type = parent[1].index.get("requested_type", "auto")
    version, info = _index_and_publish(memory, staging, parent, staged, index_type, ids,
                                       dict(skipped), skip_report)
    wall = time.perf_counter() - t0
    added = store.count - staged.first_new
    log.info("published %s %s: %d documents (%d added), %s recall@10 %.3f, %.1f s", memory,
             version, store.count, added, info.factory, info.recall_at_10, wall)
    return BuildReport(version=version, version_dir=pub.version_dir(memory, version),
                       documents=store.count, added=added, skipped=dict(skipped),
                       index=info.to_dict(), embed_calls=staged.embed_calls, wall_s=wall)


def _copy_parent(memory: Path, staging: Path, parent: tuple[str, Manifest], staged: _Staged,
                 bounds: RowBounds) -> None:
    """The parent version's rows and vectors, copied as they are (nothing re-embedded)."""
    pdir = pub.version_dir(memory, parent[0])
    old = parent[1]
    staged.counts = _Counts(old.counts.get("with_image", 0), old.counts.get("with_text", 0))
    staged.grid = tuple(old.image_grid) if old.image_grid else None
    if staged.grid:
        bounds = replace(bounds, codes_per_image=staged.grid[0] * staged.grid[1])
    old_store = DocumentStore.open(pdir / STORE_FILE)
    staged.vectors = EmbeddingsWriter(staging / EMBEDDINGS_FILE, old.embedding_dim)
    try:
        staged.store.copy_from(old_store, bounds)
    except StoreError as e:
        raise _refused(memory, parent[0], f"{STORE_FILE} {e}") from e
    finally:
        old_store.close()
    try:
        staged.vectors.copy_from(open_embeddings(pdir / EMBEDDINGS_FILE))
    except StoreError as e:
        raise _refused(memory, parent[0], f"{EMBEDDINGS_FILE} {e}") from e
    if staged.image_vectors is not None:
        _copy_rerank(memory, pdir, parent, staged)


def _copy_rerank(memory: Path, pdir: Path, parent: tuple[str, Manifest],
                 staged: _Staged) -> None:
    """The parent's rerank vectors, copied; or, for a parent built without them,
    computed from its stored image codes."""
    old = parent[1]
    staged.rerank = EmbeddingsWriter(staged.store.path.with_name(RERANK_FILE),
                                     old.embedding_dim)
    if RERANK_FILE in old.files:
        try:
            staged.rerank.copy_from(open_embeddings(pdir / RERANK_FILE))
        except StoreError as e:
            raise _refused(memory, parent[0], f"{RERANK_FILE} {e}") from e
        return
    log.info("%s has no rerank vectors: computing them from its stored image codes",
             parent[0])
    store = DocumentStore.open(pdir / STORE_FILE)
    try:
        for batch in store.batches():
            codes = [None if c is None else np.asarray(c).reshape(staged.grid)
                     for c in batch.column(4).to_pylist()]
            staged.rerank.append(_rerank_rows(staged.image_vectors, codes, staged.rerank.dim))
    finally:
        store.close()


def _rerank_rows(image_vectors: ImageVectors, codes: list[np.ndarray | None],
                 dim: int) -> np.ndarray:
    """(len(codes), dim) float32: each image's vector, zeros for a document without one."""
    out = np.zeros((len(codes), dim), dtype=np.float32)
    rows = [i for i, c in enumerate(codes) if c is not None]
    if rows:
        vecs = np.asarray(image_vectors(np.stack([codes[i] for i in rows])), dtype=np.float32)
        if vecs.shape != (len(rows), dim) or not np.isfinite(vecs).all():
            raise ValueError(f"image_vectors returned {vecs.shape} (or non-finite values), "
                             f"expected ({len(rows)}, {dim}) like the document vectors")
        out[rows] = vecs
    return out


def _add_chunk(chunk: list[SourceItem], staged: _Staged, staging: Path, skipped: Counter[str],
               embed: Embed, tokenize_text: TokenizeText, encode_images: EncodeImages) -> None:
    """Embed, tokenise and VQ-encode one chunk of documents; append its rows and vectors."""
    docs = [d for d in (_prepare(item, skipped) for item in chunk) if d is not None]
    if not docs:
        return
    vecs = _check_vectors(embed([d.caption for d in docs], [d.image for d in docs]),
                          len(docs), staged.vectors.dim if staged.vectors else None)
    staged.embed_calls += 1
    if staged.vectors is None:
        staged.vectors = EmbeddingsWriter(staging / EMBEDDINGS_FILE, vecs.shape[1])
        if staged.image_vectors is not None:
            staged.rerank = EmbeddingsWriter(staging / RERANK_FILE, vecs.shape[1])
    codes = _encode(encode_images, [d.image for d in docs])
    for c in codes:
        if c is not None and staged.grid is not None and tuple(c.shape) != staged.grid:
            raise ValueError(f"VQ grid {c.shape} differs from the memory's {staged.grid}")
        staged.grid = staged.grid or (tuple(c.shape) if c is not None else None)
    staged.store.append({
        "caption": d.caption,
        "image": d.png,
        "text_ids": tokenize_text(d.caption) if d.caption else None,
        "image_codes": c,
        "source": d.source,
    } for d, c in zip(docs, codes, strict=True))
    staged.vectors.append(vecs)
    if staged.rerank is not None:
        staged.rerank.append(_rerank_rows(staged.image_vectors, codes, staged.rerank.dim))
    staged.counts.with_image += sum(d.image is not None for d in docs)
    staged.counts.with_text += sum(d.caption is not None for d in docs)


def _index_and_publish(memory: Path, staging: Path, parent: tuple[str, Manifest] | None,
                       staged: _Staged, index_type: str, ids: dict[str, str],
                       skipped: dict[str, int], skip_report: SkipReport | None,
                       ) -> tuple[str, IndexInfo]:
    """Build the FAISS and lexical indexes over the staged version, write its manifest
    last and publish it; its version name and the index's description."""
    emb = open_embeddings(staging / EMBEDDINGS_FILE)
    index, info = build_index(emb, index_type)
    write_index(index, staging / INDEX_FILE)
    del index
    info.mmap_mode = read_index(staging / INDEX_FILE)[1]  # how it really loads, not a guess
    lexical, lexical_files = _build_lexical(staging)
    version = pub.next_version_name(memory)
    count = staged.store.count
    manifest = Manifest(
        version=version,
        components=ids or (parent[1].components if parent else {}),
        counts={"documents": count, "added": count - staged.first_new,
                "with_image": staged.counts.with_image, "with_text": staged.counts.with_text,
                "skipped": skipped, "noted": dict(skip_report.noted) if skip_report else {}},
        index=info.to_dict(),
        embedding_dim=int(emb.shape[1]),
        files={name: file_entry(staging / name) for name in
               (*DATA_FILES, *([RERANK_FILE] if staged.rerank else []), *lexical_files)},
        image_grid=list(staged.grid) if staged.grid else None,
        parent=parent[0] if parent else None,
        lexical=lexical,
        complete=True,
    )
    del emb
    write_manifest(staging, manifest)
    pub.publish(memory, staging)
    return version, info


def _build_lexical(staging: Path) -> tuple[dict[str, Any], list[str]]:
    """The BM25 index over every caption of the staged store (parent's and new alike):
    its manifest entry and its files."""
    t0 = time.perf_counter()
    store = DocumentStore.open(staging / STORE_FILE)
    try:
        index = LexicalIndex.from_store(store)
    finally:
        store.close()
    files = index.save(staging)
    log.info("lexical index: %d documents, %d terms, %.1f s", len(index), len(index.vocab),
             time.perf_counter() - t0)
    return index.describe(), files


@dataclass
class _Doc:
    caption: str | None
    image: np.ndarray | None
    png: bytes | None
    source: str


def _prepare(item: SourceItem, skipped: Counter[str]) -> _Doc | None:
    caption = (item.caption or "").strip() or None
    image, png = item.image, item.image_bytes
    try:
        if image is None and png is not None:
            image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.uint8)
        if image is not None and png is None:
            buffer = io.BytesIO()
            Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB").save(buffer, "PNG")
            png = buffer.getvalue()
    except (OSError, ValueError, TypeError) as e:
        log.debug("skipped %s: unreadable image (%s)", item.source, e)
        skipped["unreadable_image"] += 1
        return None
    if caption is None and image is None:
        skipped["empty"] += 1
        return None
    return _Doc(caption, image, png, item.source)


def _check_vectors(vecs: np.ndarray, n: int, dim: int | None) -> np.ndarray:
    vecs = np.asarray(vecs, dtype=np.float32)
    if vecs.ndim != 2 or len(vecs) != n or (dim is not None and vecs.shape[1] != dim):
        want = f"({n}, {dim})" if dim else f"({n}, D)"
        raise ValueError(f"embed returned {vecs.shape}, expected {want}")
    if not np.isfinite(vecs).all():
        raise ValueError("embed returned non-finite values")
    # inner product search assumes unit vectors; a stand-in embedder may not normalise
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True).clip(min=1e-12)


def _encode(encode_images: EncodeImages, images: list[np.ndarray | None]) -> list:
    """VQ codes per document (None without an image); one call per image size."""
    codes: list[np.ndarray | None] = [None] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        if im is not None:
            by_shape.setdefault(im.shape, []).append(i)
    for rows in by_shape.values():
        out = np.asarray(encode_images(np.stack([images[i] for i in rows])))
        if out.ndim != 3 or len(out) != len(rows):
            raise ValueError(f"encode_images returned {out.shape}, expected ({len(rows)}, h, w)")
        for i, c in zip(rows, out, strict=True):
            codes[i] = c
    return codes


def _chunks(items: Iterable[SourceItem], size: int) -> Iterator[list[SourceItem]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def build_from_source(
    items: Iterable[SourceItem],
    out_dir: str | Path,
    *,
    clip: Any,
    tokenizer: Any,
    vq: Any,
    ids: Mapping[str, str] | None = None,
    **options: Any,
) -> BuildReport:
    """`build_memory` with model objects: a ClipEncoder (`embed_documents`), a
    TextTokenizer (`encode`) and a VQModel (`encode_images` on uint8 (B, H, W, 3)).
    `options` are build_memory's (index_type, chunk_size, append, progress, skip_report).
    The rerank vectors are the CLIP image vectors of the VQ's reconstructions, exactly
    as the engine's reranker computes them (`Engine.rerank_scores`)."""
    return build_memory(items, out_dir, embed=clip.embed_documents,
                        tokenize_text=tokenizer.encode, encode_images=vq.encode_images,
                        ids=ids, codebook_size=vq.config.codebook_size,
                        text_vocab_size=tokenizer.vocab_size,
                        image_vectors=lambda codes: clip.encode_image(vq.decode_codes(codes)),
                        **options)
