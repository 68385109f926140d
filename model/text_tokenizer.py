"""Byte-level BPE for captions, trained with HF `tokenizers`.

Byte-level means every Unicode string (emoji, CJK, combining marks, runs of spaces,
newlines, the empty string) encodes to ids and decodes back to exactly the same string:
the 256 byte symbols are always in the vocabulary, so nothing is ever unknown.

The vocabulary holds no special tokens. The token space (`model.tokens`) owns the
markup, `<eos>`, `<pad>` and the sentinels, and places these raw BPE ids after them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

FILENAME = "tokenizer.json"
BYTE_ALPHABET_SIZE = 256


class TextTokenizer:
    """A byte-level BPE tokenizer: `encode(text) -> ids`, `decode(ids) -> text`."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # ids must be exactly 0..n-1, or `vocab_size` would not bound them
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError("tokenizer ids are not contiguous from 0")
        if len(vocab) < BYTE_ALPHABET_SIZE:
            raise ValueError("vocabulary lacks the 256-byte alphabet; some text would be unknown")
        self._tok = tokenizer
        self._vocab_size = len(vocab)

    @classmethod
    def train(
        cls, captions: Iterable[str], vocab_size: int, min_frequency: int = 2
    ) -> TextTokenizer:
        """Learn merges from `captions`.

        The real vocabulary may come out smaller than `vocab_size` when the corpus has too
        few distinct pairs to merge; `.vocab_size` always reports the real size.
        """
        if vocab_size < BYTE_ALPHABET_SIZE:
            raise ValueError(f"vocab_size must be >= {BYTE_ALPHABET_SIZE} (the byte alphabet)")
        tok = Tokenizer(models.BPE())
        # add_prefix_space=False: a leading space is kept as data, so decode(encode(s)) == s
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tok.train_from_iterator(captions, trainer)
        out = cls(tok)
        log.info("trained byte-level BPE: %d tokens (asked for %d)", out.vocab_size, vocab_size)
        return out

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialised tokenizer: names this exact vocabulary in manifests."""
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        # the HF decoder silently drops unknown ids; a wrong offset must fail loudly instead
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(f"BPE ids out of range [0, {self._vocab_size}): {bad[:5]}")
        return self._tok.decode(ids, skip_special_tokens=False)

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` into the directory `path`; returns the file written."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        file = directory / FILENAME
        tmp = file.with_suffix(".json.tmp")
        tmp.write_text(self._tok.to_str(pretty=False), encoding="utf-8")
        tmp.replace(file)  # atomic: a reader never sees half a tokenizer
        return file

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load from a directory holding `tokenizer.json`, or from the file itself."""
        file = Path(path)
        if file.is_dir():
            file = file / FILENAME
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer at {file}")
        return cls(Tokenizer.from_str(file.read_text(encoding="utf-8")))

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self._vocab_size})"
