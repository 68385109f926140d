"""Byte-level BPE: exact round-trips for any Unicode string, vocabulary bookkeeping."""

from __future__ import annotations

import random

import pytest

from model.text_tokenizer import TextTokenizer
from model.tokens import SPECIAL_TOKENS

CAPTIONS = [
    "a big blue square on the left",
    "a small red circle on the right",
    "a green triangle above a yellow square",
    "the flag of Veloria",
    "two small circles, one red and one blue",
] * 20

HARD_STRINGS = [
    "",
    " ",
    "   ",
    " leading space",
    "trailing space ",
    "multiple   inner    spaces",
    "\n",
    "line one\nline two\r\n\ttabbed",
    "emoji 🎉🐍👩‍👩‍👧 and flags 🇫🇷",
    "日本語のキャプション 中文 한국어",
    "combining e\u0301 a\u0308 n\u0303 and precomposed é",
    'quotes " \' and markup <img alt="x"> & &amp; &lt;',
    "<eos><pad><mask:0><break>",
    "zero\u200bwidth\u00a0nbsp\ufeffbom",
    "\x00\x01 control \x7f",
    "a" * 300,
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(CAPTIONS, vocab_size=320)


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_round_trip_is_exact(tok: TextTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_random_unicode_round_trips(tok: TextTokenizer) -> None:
    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF)]
    for _ in range(300):
        chars = []
        for _ in range(rng.randint(0, 30)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)) if rng.random() > 0.15 else rng.choice(" \n\t"))
        text = "".join(chars)
        assert tok.decode(tok.encode(text)) == text


def test_empty_string_is_no_tokens(tok: TextTokenizer) -> None:
    assert tok.encode("") == []
    assert tok.decode([]) == ""


def test_every_byte_is_in_the_vocabulary(tok: TextTokenizer) -> None:
    # one token per byte for each single-byte string: nothing falls back to "unknown"
    singles = [tok.encode(chr(b)) for b in range(128)]
    assert all(len(ids) == 1 for ids in singles)
    assert len({ids[0] for ids in singles}) == 128


def test_training_learns_merges(tok: TextTokenizer) -> None:
    assert len(tok.encode("a big blue square")) < len("a big blue square")


def test_no_special_tokens_in_bpe_vocab(tok: TextTokenizer) -> None:
    for special in SPECIAL_TOKENS:
        ids = tok.encode(special)
        assert len(ids) > 1, special
        assert tok.decode(ids) == special


def test_vocab_size_is_the_real_id_bound() -> None:
    # a tiny corpus cannot fill 5000 tokens; the reported size must be what exists
    small = TextTokenizer.train(["abc abc abd"], vocab_size=5000)
    assert 256 <= small.vocab_size < 5000
    text = " ".join(CAPTIONS[:5]) + " 🎉 日本"
    assert max(small.encode(text)) < small.vocab_size
    full = TextTokenizer.train(CAPTIONS, vocab_size=300)
    assert full.vocab_size == 300


def test_vocab_size_below_byte_alphabet_is_refused() -> None:
    with pytest.raises(ValueError, match="256"):
        TextTokenizer.train(CAPTIONS, vocab_size=100)


def test_decode_refuses_out_of_range_ids(tok: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])


def test_encode_batch_matches_encode(tok: TextTokenizer) -> None:
    assert tok.encode_batch(HARD_STRINGS) == [tok.encode(s) for s in HARD_STRINGS]
    assert tok.encode_batch([]) == []


def test_save_load_round_trip(tok: TextTokenizer, tmp_path) -> None:
    file = tok.save(tmp_path / "tok")
    assert file.name == "tokenizer.json" and file.is_file()
    for loaded in (TextTokenizer.load(tmp_path / "tok"), TextTokenizer.load(file)):
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.fingerprint == tok.fingerprint
        for text in HARD_STRINGS:
            assert loaded.encode(text) == tok.encode(text)
            assert loaded.decode(tok.encode(text)) == text


def test_fingerprint_differs_between_vocabularies(tok: TextTokenizer) -> None:
    other = TextTokenizer.train(["something else entirely"] * 5, vocab_size=300)
    assert other.fingerprint != tok.fingerprint


def test_load_missing_file_is_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        TextTokenizer.load(tmp_path)
