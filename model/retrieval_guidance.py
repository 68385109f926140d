"""Retrieval-guided decoding: what the retrieved documents hold, mixed into the next token.

RA-CM3 conditions on its neighbours only through context, and a small decoder copies a
neighbour it has never seen (a flag appended to the memory) in few samples. Two
decoding-time levers from the literature put the neighbours into the distribution
itself:

- **Image copy** (kNN-LM, Khandelwal et al. 2020): at grid cell t, the neighbours' VQ
  codes at cell t form a distribution, and the sampled one is
  p = (1 - λ) p_model + λ p_copy. Which neighbour a row copies is a posterior that
  follows the codes the row has already drawn, so two different neighbours are not
  stitched together cell by cell.
- **Caption pointer** (See et al. 2017): a name in a neighbour's caption is proposed
  where the caption being written reaches the place of that name (after the words that
  precede it in the neighbour's caption, or where the decoder itself expects a rare
  word), then continued piece by piece.

Deciding *when* to copy is the core: a neighbour that shows "a red circle on the left"
must not move a requested circle to the right. A neighbour is copied only when it is
relevant (`copy_gate`):

- the prompt names something rare (a word the tokenizer does not hold as one of its
  common tokens: a place, a person, an invented name) and the neighbour's caption has
  every such word; names are what CLIP and the decoder never learned, and a match on
  them is what a lexical index scores (where the retriever has one, its own verdict on
  the memory's rare words counts too);
- otherwise, the neighbour's caption says exactly what the prompt says, word for word,
  so no attribute can differ.

For captions, the gate is the image: a neighbour's caption is pointed at only when its
image agrees with the query image on most VQ codes.

λ is `weight * gate`; weight 0 turns all of this off and decoding is the paper's.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.tokens import TokenSpace

# The served default of `retrieval_guidance` (the copy weight λ for a relevant neighbour).
# Chosen on prompts and seeds outside the eval's (`racm3 bench guidance`, BENCHMARKS.md):
# weights 0.5 and 1.0 scored alike on object and pair prompts, memory-only entities and
# entity captions, but appended flags asked for with the API's defaults (temperature 1,
# one sample) were drawn far more often at 1.0, where a relevant neighbour's codes are
# copied exactly.
DEFAULT_WEIGHT = 1.0
MAX_WEIGHT = 1.0

# BPE merges are learned most frequent first, so a word that the tokenizer holds as one
# token among its first merges is a common word of the captions it was trained on; a
# word it spells in pieces, or only with one of its late merges, is rare.
COMMON_MERGE_FRACTION = 0.25
BYTE_ALPHABET = 256

# How sharply the image copy commits to the neighbour a row has been following:
# log-odds gained per grid cell whose drawn code equals that neighbour's.
FOLLOW_LOG_ODDS = 1.0
# Retrieval scores of the relevant neighbours are turned into copy priors by a softmax
# at this temperature: cosine scores differ in the second decimal.
SCORE_TEMPERATURE = 0.05

# A neighbour's caption is pointed at when its image has the query image's VQ code at
# this fraction of the grid cells or more: variants of one flag mostly agree on 60-95%,
# different flags on under 30%.
CAPTION_CODE_AGREEMENT = 0.5
# Where the decoder puts this much probability on rare tokens it is about to write a
# name; that is where a pointed-at caption's name goes, even if the words before differ.
NAME_SLOT_MASS = 0.3

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


class WordRarity:
    """Which words are rare, judged by the tokenizer's merge order (no corpus needed)."""

    def __init__(self, tokenizer, common_fraction: float = COMMON_MERGE_FRACTION) -> None:
        self.tokenizer = tokenizer
        merges = max(0, tokenizer.vocab_size - BYTE_ALPHABET)
        self.common_below = BYTE_ALPHABET + int(merges * common_fraction)

    @staticmethod
    def words(text: str) -> list[str]:
        return _WORD.findall(text)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one instance per engine, bounded
    def is_rare(self, word: str) -> bool:
        for form in (" " + word, word):
            ids = self.tokenizer.encode(form)
            if len(ids) == 1 and ids[0] < self.common_below:
                return False
        return True

    def rare_words(self, text: str) -> set[str]:
        return {w.lower() for w in self.words(text) if self.is_rare(w)}

    def rare_token_mask(self, space: TokenSpace, vocab_size: int) -> Tensor:
        """(V,) bool over the decoder's vocabulary: text tokens from the late merges."""
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[space.text_offset + self.common_below : space.image_offset] = True
        return mask


def copy_gate(prompt: str, caption: str | None, rarity: WordRarity,
              name_match: bool | None = None) -> float:
    """1.0 when the neighbour captioned `caption` may be copied for `prompt`, else 0.0.

    `name_match` is the retriever's verdict, when it has one, that the caption holds
    every word of the prompt that is rare in the memory (its lexical index counts them).
    """
    if name_match:
        return 1.0
    if not caption:
        return 0.0
    rare = rarity.rare_words(prompt)
    caption_words = [w.lower() for w in rarity.words(caption)]
    if rare:
        return float(rare <= set(caption_words))
    return float(caption_words == [w.lower() for w in rarity.words(prompt)])


def copy_priors(gates: Sequence[float], scores: Sequence[float]) -> np.ndarray:
    """Relevant neighbours' share of the copy distribution: softmax of their retrieval
    scores over the gated ones (zeros where the gate is 0; all zeros when none passes)."""
    g = np.asarray(gates, dtype=np.float64)
    if not len(g) or g.max() <= 0:
        return np.zeros(len(g))
    s = np.asarray([x if math.isfinite(x) else -1e9 for x in scores], dtype=np.float64)
    logits = np.where(g > 0, s / SCORE_TEMPERATURE, -np.inf)
    w = np.exp(logits - logits[g > 0].max()) * g
    return w / w.sum()


# --- images: kNN-style copy of the neighbours' codes ----------------------------------


@dataclass
class ImageCopySource:
    """One output row's copy material: K neighbours' token ids per cell and priors."""

    token_ids: np.ndarray  # (K, L) decoder ids of each neighbour's codes, raster order
    priors: np.ndarray  # (K,) summing to 1
    weight: float  # λ for this row


class ImageCopy:
    """A logits processor for caption→image rows that all start at the first grid cell.

    `sources[r]` is row r's copy material, or None for a row that copies nothing.
    """

    def __init__(self, sources: Sequence[ImageCopySource | None], image_len: int,
                 device: torch.device | str = "cpu") -> None:
        rows = len(sources)
        k = max([s.token_ids.shape[0] for s in sources if s is not None] or [1])
        ids = np.zeros((rows, k, image_len), dtype=np.int64)
        log_prior = np.full((rows, k), -np.inf)
        weight = np.zeros(rows)
        for r, s in enumerate(sources):
            if s is None or s.weight <= 0 or s.priors.sum() <= 0:
                continue
            n = s.token_ids.shape[0]
            ids[r, :n] = s.token_ids
            with np.errstate(divide="ignore"):
                log_prior[r, :n] = np.log(s.priors)
            weight[r] = s.weight
        log_prior[weight == 0] = 0.0  # never used: those rows' λ is 0
        self.ids = torch.as_tensor(ids, device=device)
        self.log_prior = torch.as_tensor(log_prior, dtype=torch.float32, device=device)
        self.weight = torch.as_tensor(weight, dtype=torch.float32, device=device)
        self.followed = torch.zeros(rows, k, device=device)
        self.t = 0
        self.image_len = image_len

    def __call__(self, logits: Tensor) -> Tensor:
        if self.t >= self.image_len or not bool((self.weight > 0).any()):
            return logits
        posterior = (self.log_prior + FOLLOW_LOG_ODDS * self.followed).softmax(-1)  # (R, K)
        p_copy = torch.zeros_like(logits, dtype=torch.float32)
        p_copy.scatter_add_(1, self.ids[:, :, self.t], posterior)
        return _mix(logits, p_copy, self.weight)

    def advance(self, tokens: Tensor) -> None:
        if self.t < self.image_len:
            self.followed += (self.ids[:, :, self.t] == tokens[:, None]).float()
        self.t += 1

    def select(self, rows: Tensor) -> None:
        """Keep only `rows` (the others left the batch), in that order."""
        rows = rows.to(self.ids.device)
        self.ids = self.ids.index_select(0, rows)
        self.log_prior = self.log_prior.index_select(0, rows)
        self.weight = self.weight.index_select(0, rows)
        self.followed = self.followed.index_select(0, rows)


def image_copy_source(space: TokenSpace, prompt: str, neighbours: Sequence,
                      rarity: WordRarity, weight: float) -> ImageCopySource | None:
    """The copy material for one caption→image job, or None when no neighbour is relevant."""
    if weight <= 0:
        return None
    with_image = [nb for nb in neighbours if nb.image_codes is not None]
    gates = [copy_gate(prompt, _caption(nb, rarity), rarity, nb.name_match)
             for nb in with_image]
    priors = copy_priors(gates, [nb.score for nb in with_image])
    if not priors.any():
        return None
    ids = np.stack([np.asarray(space.codes_to_ids(nb.image_codes)) for nb in with_image])
    return ImageCopySource(ids, priors, weight)


# --- captions: a pointer to the neighbours' names -------------------------------------


@dataclass(frozen=True)
class PointedWord:
    """A rare word of a neighbour's caption, as decoder text ids, and what precedes it."""

    pieces: tuple[int, ...]
    before: int | None  # the caption's token just before the word (None at its start)
    gate: float


class CaptionPointer:
    """A logits processor for image→caption rows: proposes the neighbours' rare words.

    `words[r]` lists row r's pointed-at words (empty: the row is decoded unchanged). A word
    is proposed from its first piece where the row's last token is the one that precedes
    it in its caption, or where the decoder puts `NAME_SLOT_MASS` on rare tokens; once
    begun it is continued piece by piece; a word already written is not proposed again.
    """

    def __init__(self, words: Sequence[Sequence[PointedWord]], weight: float,
                 rare_tokens: Tensor) -> None:
        self.words = [list(w) for w in words]
        self.weight = weight
        self.rare_tokens = rare_tokens
        self.written: list[list[int]] = [[] for _ in words]

    def __call__(self, logits: Tensor) -> Tensor:
        if self.weight <= 0 or not any(self.words):
            return logits
        rare = self.rare_tokens.to(logits.device)
        p_copy = torch.zeros_like(logits, dtype=torch.float32)
        weight = torch.zeros(logits.size(0), device=logits.device)
        name_mass = None
        for r, words in enumerate(self.words):
            if not words:
                continue
            proposal = self._continuation(r)
            if not proposal:
                if name_mass is None:
                    probs = logits.float().softmax(-1)
                    name_mass = (probs[:, : rare.numel()] * rare[: probs.size(1)]).sum(-1)
                proposal = self._starts(r, float(name_mass[r]))
            if not proposal:
                continue
            total = sum(proposal.values())
            for token, g in proposal.items():
                p_copy[r, token] += g / total
            weight[r] = self.weight * max(proposal.values())
        return _mix(logits, p_copy, weight)

    def _continuation(self, r: int) -> dict[int, float]:
        out: dict[int, float] = {}
        written = self.written[r]
        for w in self.words[r]:
            for j in range(min(len(w.pieces) - 1, len(written)), 0, -1):
                if tuple(written[-j:]) == w.pieces[:j]:
                    out[w.pieces[j]] = max(out.get(w.pieces[j], 0.0), w.gate)
                    break
        return out

    def _starts(self, r: int, name_mass: float) -> dict[int, float]:
        out: dict[int, float] = {}
        written = self.written[r]
        last = written[-1] if written else None
        for w in self.words[r]:
            if _contains(written, w.pieces):
                continue
            if w.before == last or name_mass >= NAME_SLOT_MASS:
                out[w.pieces[0]] = max(out.get(w.pieces[0], 0.0), w.gate)
        return out

    def advance(self, tokens: Tensor) -> None:
        for r, t in enumerate(tokens.tolist()):
            self.written[r].append(int(t))

    def select(self, rows: Tensor) -> None:
        """Keep only `rows` (the others left the batch), in that order."""
        kept = rows.tolist()
        self.words = [self.words[r] for r in kept]
        self.written = [self.written[r] for r in kept]


def pointed_words(space: TokenSpace, query_codes: np.ndarray, neighbours: Sequence,
                  rarity: WordRarity) -> list[PointedWord]:
    """The rare words of the neighbours whose images agree with the query image."""
    out: list[PointedWord] = []
    query = np.asarray(query_codes).reshape(-1)
    for nb in neighbours:
        if nb.image_codes is None:
            continue
        agreement = float((np.asarray(nb.image_codes).reshape(-1) == query).mean())
        if agreement < CAPTION_CODE_AGREEMENT:
            continue
        text_ids = list(nb.text_ids) if nb.text_ids else rarity.tokenizer.encode(nb.caption or "")
        for pieces, before in _rare_word_spans(text_ids, rarity):
            out.append(PointedWord(tuple(space.text_to_ids(pieces)),
                                   None if before is None else space.text_to_ids([before])[0],
                                   gate=1.0))
    return out


def _rare_word_spans(text_ids: Sequence[int], rarity: WordRarity,
                     ) -> list[tuple[list[int], int | None]]:
    """(the word's BPE ids, the id before them) for every rare word of a caption. A word's
    ids include a token of its own leading space, so the copy is spaced as the caption."""
    tok = rarity.tokenizer
    pieces = [tok.decode([t]) for t in text_ids]
    text = "".join(pieces)
    ends = np.cumsum([len(p) for p in pieces])
    starts = ends - np.asarray([len(p) for p in pieces])
    spans = []
    for m in _WORD.finditer(text):
        if not rarity.is_rare(m.group()):
            continue
        lo = m.start() - 1 if m.start() > 0 and text[m.start() - 1] == " " else m.start()
        covered = [i for i in range(len(pieces)) if starts[i] < m.end() and ends[i] > lo]
        if covered:
            first = covered[0]
            spans.append(([int(text_ids[i]) for i in covered],
                          int(text_ids[first - 1]) if first > 0 else None))
    return spans


# --- shared -------------------------------------------------------------------------------


def _mix(logits: Tensor, p_copy: Tensor, weight: Tensor) -> Tensor:
    """log((1 - λ) softmax(logits) + λ p_copy), row-wise λ; rows with λ = 0 untouched."""
    active = weight > 0
    if not bool(active.any()):
        return logits
    lam = weight.clamp(0, 1)[:, None].to(logits.device)
    logp = logits.float().log_softmax(-1)
    with torch.no_grad():
        mixed = torch.logaddexp(torch.log1p(-lam.clamp(max=1 - 1e-6)) + logp,
                                torch.log(lam * p_copy + 1e-30))
        # a copy target the constraint forbids stays forbidden
        mixed = mixed.masked_fill(torch.isinf(logp) & (logp < 0), float("-inf"))
    return torch.where(active[:, None], mixed, logits.float())


def _contains(seq: Sequence[int], sub: Sequence[int]) -> bool:
    n = len(sub)
    return any(tuple(seq[i : i + n]) == tuple(sub) for i in range(len(seq) - n + 1))


def _caption(nb, rarity: WordRarity) -> str | None:
    if nb.caption:
        return nb.caption
    if nb.text_ids:
        return rarity.tokenizer.decode(list(nb.text_ids))
    return None
