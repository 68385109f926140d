"""The token space: id ranges, Document <-> ids <-> HTML, and assembled sequences."""

from __future__ import annotations

import numpy as np
import pytest

from model.text_tokenizer import TextTokenizer
from model.tokens import (
    BREAK_ID,
    EOS_ID,
    IMG_CLOSE_ID,
    IMG_OPEN_ID,
    MASK_IDS,
    NUM_SPECIAL,
    PAD_ID,
    SEG_MAIN,
    SEG_RETRIEVED,
    SRC_ID,
    Document,
    TokenSpace,
    assemble,
    mask_id,
    parse_html,
    render_html,
)

CAPTIONS = [
    "a big blue square on the left",
    "a small red circle on the right",
    "the flag of Veloria",
] * 10

TRICKY_CAPTIONS = [
    "a big blue square on the left",
    'she said "hi" & left',
    'x < y > z and a <img alt="fake"> tag',
    "literal entities &amp; &lt; &#39; stay literal",
    "it's 'single' quoted",
    "emoji 🎉 and 日本語 and e\u0301",
    "  spaced   out  ",
    "line\nbreak",
    "<eos> <mask:3> <v12> <break>",
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(CAPTIONS, vocab_size=300)


@pytest.fixture(scope="module")
def space(tok: TextTokenizer) -> TokenSpace:
    return TokenSpace(text_vocab_size=tok.vocab_size, codebook_size=64, image_grid=(4, 4))


def _codes(seed: int, space: TokenSpace) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, space.codebook_size, space.image_grid)


def test_id_ranges_partition_the_vocabulary(space: TokenSpace) -> None:
    kinds = [
        (space.is_special(t), space.is_text(t), space.is_image(t)) for t in range(space.vocab_size)
    ]
    assert all(sum(k) == 1 for k in kinds)
    assert sum(k[0] for k in kinds) == NUM_SPECIAL
    assert sum(k[1] for k in kinds) == space.text_vocab_size
    assert sum(k[2] for k in kinds) == space.codebook_size
    assert not space.is_image(space.vocab_size) and not space.is_special(-1)
    assert space.padded_vocab_size % 64 == 0 and space.padded_vocab_size >= space.vocab_size
    assert PAD_ID == 0
    assert len(set(MASK_IDS)) == 16 and mask_id(15) == MASK_IDS[15]
    with pytest.raises(ValueError):
        mask_id(16)


def test_token_space_dict_round_trip(space: TokenSpace) -> None:
    assert TokenSpace.from_dict(space.to_dict()) == space


@pytest.mark.parametrize("caption", TRICKY_CAPTIONS)
def test_text_and_image_document_round_trips(
    caption: str, tok: TextTokenizer, space: TokenSpace
) -> None:
    doc = Document(caption=caption, image_codes=_codes(1, space))
    ids = doc.to_ids(space, tok.encode)
    assert ids[0] == IMG_OPEN_ID and ids[-1] == IMG_CLOSE_ID and ids.count(SRC_ID) == 1
    assert Document.from_ids(ids, space, tok.decode) == doc
    html_text = doc.to_html(space, tok.encode, tok.decode)
    assert html_text.startswith('<img alt="') and html_text.endswith('">')
    # escaped text can never contain markup characters of its own
    alt = html_text[len('<img alt="') : html_text.index('" src="')]
    assert "<" not in alt and '"' not in alt
    assert Document.from_html(html_text, space, tok.encode, tok.decode) == doc
    assert parse_html(html_text, space, tok.encode) == ids


def test_text_only_document(tok: TextTokenizer, space: TokenSpace) -> None:
    doc = Document(caption="the flag of Veloria 🏳")
    ids = doc.to_ids(space, tok.encode)
    assert ids[-2:] == [SRC_ID, IMG_CLOSE_ID]
    html_text = render_html(ids, space, tok.decode)
    assert html_text == '<img alt="the flag of Veloria 🏳" src="">'
    back = Document.from_html(html_text, space, tok.encode, tok.decode)
    assert back == doc and not back.has_image


def test_image_only_document(tok: TextTokenizer, space: TokenSpace) -> None:
    codes = _codes(2, space)
    doc = Document(image_codes=codes)
    ids = doc.to_ids(space, tok.encode)
    assert ids[:2] == [IMG_OPEN_ID, SRC_ID]
    html_text = render_html(ids, space, tok.decode)
    expected_src = "".join(f"<v{c}>" for c in codes.reshape(-1))
    assert html_text == f'<img alt="" src="{expected_src}">'
    back = Document.from_html(html_text, space, tok.encode, tok.decode)
    assert back == doc and back.caption is None and not back.has_text


def test_empty_caption_is_no_caption(space: TokenSpace) -> None:
    assert Document(caption="", image_codes=_codes(3, space)).caption is None
    with pytest.raises(ValueError):
        Document(caption="")
    with pytest.raises(ValueError):
        Document()


def test_document_equality_compares_image_codes(space: TokenSpace) -> None:
    a = Document(caption="x", image_codes=_codes(4, space))
    b = Document(caption="x", image_codes=_codes(4, space))
    c = Document(caption="x", image_codes=_codes(5, space))
    assert a == b and a != c and a != Document(caption="x")


def test_from_ids_rejects_malformed(tok: TextTokenizer, space: TokenSpace) -> None:
    good = Document(caption="a big", image_codes=_codes(6, space)).to_ids(space, tok.encode)
    bad_cases = [
        good[1:],  # no opening
        good[:-1],  # no closing
        [t for t in good if t != SRC_ID],  # no src
        good[:-2] + [SRC_ID, IMG_CLOSE_ID],  # two src
        good[:-2] + [IMG_CLOSE_ID],  # 15 codes instead of 16
    ]
    s = good.index(SRC_ID)
    bad_cases.append(good[: s + 1] + [space.text_offset] + good[s + 2 :])  # text inside src
    bad_cases.append([IMG_OPEN_ID, space.image_offset, *good[s:]])  # code inside alt
    for ids in bad_cases:
        with pytest.raises(ValueError):
            Document.from_ids(ids, space, tok.decode)


def test_codes_out_of_range_are_refused(space: TokenSpace) -> None:
    with pytest.raises(ValueError):
        space.codes_to_ids([space.codebook_size])
    with pytest.raises(ValueError):
        parse_html(f"<v{space.codebook_size}>", space, lambda s: [])


def test_render_rejects_ids_outside_vocabulary(tok: TextTokenizer, space: TokenSpace) -> None:
    # ids in the padding above vocab_size exist in the embedding but are not tokens
    for bad in (-1, space.vocab_size, space.padded_vocab_size - 1):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            render_html([bad], space, tok.decode)


def test_sequence_with_masks_breaks_and_eos_round_trips(
    tok: TextTokenizer, space: TokenSpace
) -> None:
    retrieved = [
        Document(caption="a small red circle", image_codes=_codes(7, space)),
        Document(caption='quote " & <', image_codes=_codes(8, space)),
    ]
    codes = space.codes_to_ids(_codes(9, space))
    text = space.text_to_ids(tok.encode("a big blue square"))
    # CM3 form with masks cut at word and image-code boundaries
    main = [IMG_OPEN_ID, mask_id(0), SRC_ID, *codes[:5], mask_id(1), *codes[9:], IMG_CLOSE_ID]
    main += [mask_id(0), *text, mask_id(1), *codes[5:9]]
    seq = assemble([d.to_ids(space, tok.encode) for d in retrieved], main).ids
    html_text = render_html(seq, space, tok.decode)
    assert html_text.count("<break>") == 2 and html_text.endswith("<eos>")
    assert html_text.count("<mask:0>") == 2 and html_text.count("<mask:1>") == 2
    assert '<img alt="<mask:0>" src="' in html_text
    assert '<img alt="quote &quot; &amp; &lt;" src="' in html_text
    assert parse_html(html_text, space, tok.encode) == seq
    assert render_html(parse_html(html_text, space, tok.encode), space, tok.decode) == html_text


def test_parse_html_accepts_hand_written_prompt(tok: TextTokenizer, space: TokenSpace) -> None:
    # the CM3 captioning prompt, as a user would type it
    codes = _codes(10, space).reshape(-1)
    src = "".join(f"<v{c}>" for c in codes)
    ids = parse_html(f'<img alt="<mask:0>" src="{src}"><mask:0>', space, tok.encode)
    assert ids == [
        IMG_OPEN_ID,
        mask_id(0),
        SRC_ID,
        *space.codes_to_ids(codes),
        IMG_CLOSE_ID,
        mask_id(0),
    ]
    assert parse_html("<pad><eos>", space, tok.encode) == [PAD_ID, EOS_ID]
    # only ASCII digits make an image code; anything else is plain text
    assert all(space.is_text(t) for t in parse_html("<v٣>", space, tok.encode))


def test_assemble_segments(tok: TextTokenizer, space: TokenSpace) -> None:
    r1 = Document(caption="a small red circle").to_ids(space, tok.encode)
    r2 = Document(image_codes=_codes(11, space)).to_ids(space, tok.encode)
    main = Document(caption="a big", image_codes=_codes(12, space)).to_ids(space, tok.encode)
    a = assemble([r1, r2], main)
    assert a.ids == [*r1, BREAK_ID, *r2, BREAK_ID, *main, EOS_ID]
    n_retr = len(r1) + len(r2) + 2
    assert a.segments == [SEG_RETRIEVED] * n_retr + [SEG_MAIN] * (len(main) + 1)
    assert a.segments.index(SEG_MAIN) == n_retr
    no_retrieval = assemble([], main, eos=False)
    assert no_retrieval.ids == main and no_retrieval.segments == [SEG_MAIN] * len(main)
