"""A lexical (BM25) index over the memory's captions, kept beside the FAISS index.

CLIP scores a name it never learned ("the flag of Veloria") by the rest of the prompt,
so to it every flag looks alike; a word match scores exactly that name. The index is
bm25s's sparse score matrix, one column of postings (document, BM25 weight) per term,
saved as `.npy`/`.json` files under `lexical/` of a memory version and memory-mapped at
load. bm25s only builds and stores the matrix: queries are scored here from the
postings of the query's own terms, so a query costs the length of its terms' postings,
and equal scores rank by document id (results never depend on partition order).

The tokenizer is part of the index's format (`TOKENIZER`, in `lexical.json`): Unicode
words, case-folded, minus a short English stopword list. Possessives split ("Veloria's"
gives "veloria" and the stopword "s"), so paraphrases still match the name.

Captions are read back from the document store, which makes the index a function of
the store alone: an appended version rebuilds it over parent and new documents, and a
memory built before this index existed gets one at load (`LexicalIndex.from_store`).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.publish import fsync_path

if TYPE_CHECKING:
    from retrieval.store import DocumentStore

LEXICAL_DIR = "lexical"
TOKENIZER = "unicode-words-casefold-stop-en-v1"
_PARAMS_FILE = "params.index.json"
_VOCAB_FILE = "vocab.index.json"
_MATRIX_FILES = ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy")
_META_FILE = "lexical.json"  # ours: the tokenizer's name, counts, BM25 parameters
LEXICAL_FILES = tuple(f"{LEXICAL_DIR}/{name}" for name in
                      (_META_FILE, _PARAMS_FILE, _VOCAB_FILE, *_MATRIX_FILES))

_WORD = re.compile(r"[^\W_]+")
# bm25s's STOPWORDS_EN (Lucene's list) plus the possessive "s": words that carry no
# subject. Positions ("left", "above") and colours stay: they are what a caption says.
STOPWORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is",
    "it", "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there",
    "these", "they", "this", "to", "was", "will", "with", "s",
))
# A query term counts as rare (a name, most often) when at most this share of the
# memory's documents contain it (at least one: below 100 documents, only words of a
# single caption), and at least one does. In the demo memory a name is in 0.03-0.2% of
# the captions, every other word in at least 2%.
RARE_DOCUMENT_SHARE = 0.01


def tokenize(text: str | None) -> list[str]:
    """Index terms of a caption or query, in order (repeats kept: BM25 counts them)."""
    if not text:
        return []
    words = _WORD.findall(unicodedata.normalize("NFKC", text).casefold())
    return [w for w in words if w not in STOPWORDS]


@dataclass(frozen=True)
class LexicalMatch:
    """How one document's caption matches a query's words."""

    score: float  # BM25 of the caption for the query; 0.0 when no term matches
    rare_terms: int  # the query's rare terms (names) in the memory
    rare_matched: int  # of those, how many the caption contains

    @property
    def name_match(self) -> bool:
        """The caption holds every rare word of the query, and the query has one."""
        return self.rare_terms > 0 and self.rare_matched == self.rare_terms


class LexicalIndex:
    """BM25 over captions: `search` for the top n ids, `match` to score given ones."""

    def __init__(self, vocab: dict[str, int], data: np.ndarray, indices: np.ndarray,
                 indptr: np.ndarray, n_docs: int, params: dict[str, Any] | None = None) -> None:
        self.vocab = vocab
        self.data = data  # (nnz,) float32 BM25 weight of (term, document)
        self.indices = indices  # (nnz,) document ids, grouped by term
        self.indptr = indptr  # (n_terms + 1,) term t's postings: indptr[t]:indptr[t + 1]
        self.n_docs = int(n_docs)
        self.params = dict(params or {})
        self._rare_df = max(1, int(RARE_DOCUMENT_SHARE * self.n_docs))

    def __len__(self) -> int:
        return self.n_docs

    def __repr__(self) -> str:
        return f"LexicalIndex({self.n_docs} documents, {len(self.vocab)} terms)"

    # --- build, save, load -----------------------------------------------------------

    @classmethod
    def build(cls, captions: Iterable[str | None]) -> LexicalIndex:
        """Index captions in id order; a document without a caption matches nothing."""
        import bm25s

        corpus = [tokenize(c) for c in captions]
        if not corpus:
            raise ValueError("no documents to index")
        bm25 = bm25s.BM25()  # Lucene's BM25, k1 = 1.5, b = 0.75
        if not any(corpus):  # no caption has a word: nothing can ever match
            return cls({}, np.zeros(0, np.float32), np.zeros(0, np.int32),
                       np.zeros(1, np.int64), len(corpus), _bm25_params(bm25))
        bm25.index(corpus, show_progress=False, create_empty_token=False)
        scores = bm25.scores
        return cls(dict(bm25.vocab_dict), np.asarray(scores["data"], np.float32),
                   np.asarray(scores["indices"]), np.asarray(scores["indptr"]),
                   int(scores["num_docs"]), _bm25_params(bm25))

    @classmethod
    def from_store(cls, store: DocumentStore) -> LexicalIndex:
        return cls.build(store_captions(store))

    def save(self, version_dir: str | Path) -> list[str]:
        """Write the index into `version_dir/lexical/`; returns the files' names relative
        to `version_dir`, for the manifest."""
        import bm25s

        folder = Path(version_dir) / LEXICAL_DIR
        bm25 = bm25s.BM25(**{k: self.params[k] for k in ("k1", "b", "delta", "method",
                                                          "idf_method") if k in self.params})
        bm25.scores = {"data": self.data, "indices": self.indices, "indptr": self.indptr,
                       "num_docs": self.n_docs}
        bm25.vocab_dict = self.vocab
        bm25.nonoccurrence_array = None  # Lucene's BM25 has none
        bm25.save(str(folder))
        (folder / _META_FILE).write_text(json.dumps(self.describe(), indent=2, sort_keys=True))
        fsync_path(folder)  # publish syncs the files and the version directory, not this one
        written = sorted(p.name for p in folder.iterdir() if p.is_file())
        missing = set(LEXICAL_FILES) - {f"{LEXICAL_DIR}/{n}" for n in written}
        if missing:  # a bm25s release that names its files otherwise
            raise RuntimeError(f"bm25s did not write {sorted(missing)}")
        return list(LEXICAL_FILES)

    @classmethod
    def load(cls, version_dir: str | Path) -> LexicalIndex:
        """Open `version_dir/lexical/`, its postings memory-mapped."""
        folder = Path(version_dir) / LEXICAL_DIR
        meta = json.loads((folder / _META_FILE).read_text())
        if meta.get("tokenizer") != TOKENIZER:
            raise ValueError(f"{folder} was tokenised by {meta.get('tokenizer')!r}, this "
                             f"code reads {TOKENIZER!r}: rebuild the memory")
        params = json.loads((folder / _PARAMS_FILE).read_text())
        vocab = json.loads((folder / _VOCAB_FILE).read_text())
        data, indices, indptr = (np.load(folder / name, mmap_mode="r")
                                 for name in _MATRIX_FILES)
        n_docs = int(params.get("num_docs", meta["documents"]))
        if len(indptr) != max(vocab.values(), default=-1) + 2 or len(data) != len(indices):
            raise ValueError(f"{folder}: postings and vocabulary disagree")
        if len(indices) and int(indices.max()) >= n_docs:
            raise ValueError(f"{folder}: a posting names a document beyond {n_docs}")
        return cls(vocab, data, indices, indptr, n_docs, params)

    def describe(self) -> dict[str, Any]:
        """For the manifest and /v1/info."""
        return {"type": "bm25", "library": "bm25s", "tokenizer": TOKENIZER,
                "documents": self.n_docs, "terms": len(self.vocab),
                "postings": int(len(self.indices)),
                **{k: self.params[k] for k in ("k1", "b", "method") if k in self.params}}

    # --- queries ---------------------------------------------------------------------

    def term_ids(self, text: str | None) -> list[int]:
        """The query's terms that the memory holds (unknown words cannot match)."""
        return [self.vocab[t] for t in tokenize(text) if t in self.vocab]

    def document_frequency(self, term_id: int) -> int:
        return int(self.indptr[term_id + 1] - self.indptr[term_id])

    def rare_term_ids(self, term_ids: Sequence[int]) -> list[int]:
        """Distinct query terms held by at most RARE_DOCUMENT_SHARE of the documents."""
        return sorted({t for t in term_ids if self.document_frequency(t) <= self._rare_df})

    def scores(self, term_ids: Sequence[int]) -> np.ndarray:
        """(n_docs,) float32 BM25 of every document for the query terms (a repeated term
        counts again, as in bm25s)."""
        out = np.zeros(self.n_docs, dtype=np.float32)
        for t in term_ids:
            lo, hi = int(self.indptr[t]), int(self.indptr[t + 1])
            # a term's postings name each document once, so a plain indexed add is exact
            out[np.asarray(self.indices[lo:hi])] += np.asarray(self.data[lo:hi])
        return out

    def search(self, texts: Sequence[str | None], n: int) -> tuple[np.ndarray, np.ndarray]:
        """Top n (scores, ids) per query text, best first, ties by id; documents that
        match no term are left out (id -1, score 0)."""
        scores = np.zeros((len(texts), n), dtype=np.float32)
        ids = np.full((len(texts), n), -1, dtype=np.int64)
        for row, text in enumerate(texts):
            terms = self.term_ids(text)
            if not terms:
                continue
            total = self.scores(terms)
            top = _top_by_score(total, n)
            scores[row, : len(top)] = total[top]
            ids[row, : len(top)] = top
        return scores, ids

    def match(self, text: str | None, ids: Sequence[int]) -> list[LexicalMatch]:
        """How each document in `ids` matches the query text's words."""
        terms = self.term_ids(text)
        rare = self.rare_term_ids(terms)
        ids = np.asarray(ids, dtype=np.int64)
        bm25 = np.zeros(len(ids), dtype=np.float32)
        matched = np.zeros(len(ids), dtype=np.int64)
        rare_set = set(rare)
        for t in terms:  # every term in the vocabulary has at least one posting
            lo, hi = int(self.indptr[t]), int(self.indptr[t + 1])
            postings = np.asarray(self.indices[lo:hi])
            pos = np.minimum(np.searchsorted(postings, ids), hi - lo - 1)  # sorted by id
            hit = postings[pos] == ids
            bm25 += np.where(hit, np.asarray(self.data[lo:hi])[pos], 0.0)
            if t in rare_set:
                rare_set.discard(t)  # a repeated rare word counts once
                matched += hit
        return [LexicalMatch(float(s), len(rare), int(m))
                for s, m in zip(bm25, matched, strict=True)]


def lexical_files(files: Iterable[str]) -> tuple[str, ...]:
    """The lexical index's files when a manifest lists any of them (it must then list
    them all), else none: a memory built before the lexical index existed."""
    return LEXICAL_FILES if any(f.startswith(LEXICAL_DIR + "/") for f in files) else ()


def _top_by_score(total: np.ndarray, n: int) -> np.ndarray:
    """Ids of the n best positive scores, best first; among equal scores, lowest id."""
    positive = np.flatnonzero(total > 0)
    if len(positive) > n:
        kth = np.partition(total[positive], len(positive) - n)[len(positive) - n]
        above = positive[total[positive] > kth]
        tied = positive[total[positive] == kth][: n - len(above)]
        positive = np.concatenate([above, tied])
    return positive[np.lexsort((positive, -total[positive]))]


def _bm25_params(bm25: object) -> dict[str, Any]:
    return {k: getattr(bm25, k) for k in ("k1", "b", "delta", "method", "idf_method")}


def store_captions(store: DocumentStore) -> Iterator[str | None]:
    """Every document's caption, in id order, read column-wise from the store."""
    for batch in store.batches():
        yield from batch.column(1).to_pylist()
