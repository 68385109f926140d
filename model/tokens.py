"""The CM3 token space and the HTML document format.

Every document is `<img alt="[text]" src="[image]">`. The id space is laid out as

    [special tokens | text BPE ids | image VQ codes]

so one integer tells which modality a token belongs to. The markup pieces are single
special tokens, which lets the decoder (and the modality-constrained sampler) always
know what comes next.

HTML rendering is a lossless, unambiguous view of a token sequence:
- special tokens render literally (`<img alt="`, `" src="`, `">`, `<break>`, `<mask:3>`…);
- text renders HTML-escaped, so it can never contain `<` or `"` and never collides
  with markup;
- an image code k renders as `<v{k}>`.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

NUM_MASKS = 16  # CM3 draws at most 16 spans

IMG_OPEN = '<img alt="'
SRC = '" src="'
IMG_CLOSE = '">'
BREAK = "<break>"
EOS = "<eos>"
PAD = "<pad>"
MASKS = tuple(f"<mask:{i}>" for i in range(NUM_MASKS))

# Order fixes the ids; <pad> is 0 so zero-initialised buffers are padding.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, BREAK, IMG_OPEN, SRC, IMG_CLOSE, *MASKS)
SPECIAL_IDS = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}

PAD_ID = SPECIAL_IDS[PAD]
EOS_ID = SPECIAL_IDS[EOS]
BREAK_ID = SPECIAL_IDS[BREAK]
IMG_OPEN_ID = SPECIAL_IDS[IMG_OPEN]
SRC_ID = SPECIAL_IDS[SRC]
IMG_CLOSE_ID = SPECIAL_IDS[IMG_CLOSE]
MASK_IDS = tuple(SPECIAL_IDS[m] for m in MASKS)
NUM_SPECIAL = len(SPECIAL_TOKENS)


def mask_id(i: int) -> int:
    if not 0 <= i < NUM_MASKS:
        raise ValueError(f"mask index {i} out of range [0, {NUM_MASKS})")
    return MASK_IDS[i]


@dataclass(frozen=True)
class TokenSpace:
    """Maps the three id ranges into one vocabulary.

    `text_vocab_size` is the BPE vocabulary; `codebook_size` the VQ codebook;
    `image_grid` the (h, w) of an image's code grid.
    """

    text_vocab_size: int
    codebook_size: int
    image_grid: tuple[int, int] = (8, 8)

    @property
    def text_offset(self) -> int:
        return NUM_SPECIAL

    @property
    def image_offset(self) -> int:
        return NUM_SPECIAL + self.text_vocab_size

    @property
    def vocab_size(self) -> int:
        return self.image_offset + self.codebook_size

    @property
    def padded_vocab_size(self) -> int:
        # padded up to a multiple of 64 so the embedding/LM-head matmuls stay aligned
        return (self.vocab_size + 63) // 64 * 64

    @property
    def image_len(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    def is_special(self, tok: int) -> bool:
        return 0 <= tok < NUM_SPECIAL

    def is_text(self, tok: int) -> bool:
        return self.text_offset <= tok < self.image_offset

    def is_image(self, tok: int) -> bool:
        return self.image_offset <= tok < self.vocab_size

    def text_to_ids(self, bpe_ids: Sequence[int]) -> list[int]:
        return [self.text_offset + int(t) for t in bpe_ids]

    def ids_to_text(self, ids: Sequence[int]) -> list[int]:
        return [int(t) - self.text_offset for t in ids]

    def codes_to_ids(self, codes: np.ndarray | Sequence[int]) -> list[int]:
        flat = np.asarray(codes, dtype=np.int64).reshape(-1)  # raster order
        if flat.size and (flat.min() < 0 or flat.max() >= self.codebook_size):
            raise ValueError(f"image code out of range [0, {self.codebook_size})")
        return (flat + self.image_offset).tolist()

    def ids_to_codes(self, ids: Sequence[int]) -> np.ndarray:
        return np.asarray(ids, dtype=np.int64) - self.image_offset

    def document_ids(self, text_ids: Sequence[int] | None,
                     codes: np.ndarray | Sequence[int] | None) -> list[int]:
        """`<img alt="[text]" src="[image]">` from raw BPE ids and VQ codes (any shape,
        raster order); a missing part (None or empty text) leaves its slot empty."""
        text = self.text_to_ids(text_ids) if text_ids is not None and len(text_ids) else []
        image = self.codes_to_ids(codes) if codes is not None else []
        return [IMG_OPEN_ID, *text, SRC_ID, *image, IMG_CLOSE_ID]

    def to_dict(self) -> dict:
        return {
            "text_vocab_size": self.text_vocab_size,
            "codebook_size": self.codebook_size,
            "image_grid": list(self.image_grid),
        }

    @classmethod
    def from_dict(cls, d: dict) -> TokenSpace:
        return cls(d["text_vocab_size"], d["codebook_size"], tuple(d["image_grid"]))


# Text tokenizers are passed as two callables so this module needs no BPE import:
# encode(str) -> raw BPE ids, decode(raw BPE ids) -> str.
Encode = Callable[[str], list[int]]
Decode = Callable[[Sequence[int]], str]


@dataclass
class Document:
    """One multimodal document: a caption and/or a grid of image codes."""

    caption: str | None = None
    image_codes: np.ndarray | None = None  # (h, w) int VQ codes, raster order
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # "" renders exactly like a missing caption (`alt=""`), so it is stored as None:
        # otherwise Document("") would be accepted here and refused by from_ids
        if self.caption == "":
            self.caption = None
        if self.caption is None and self.image_codes is None:
            raise ValueError("a document needs a caption, an image, or both")
        if self.image_codes is not None:
            self.image_codes = np.asarray(self.image_codes, dtype=np.int64)
            if self.image_codes.ndim != 2:
                raise ValueError("image_codes must be a 2-D (h, w) grid")

    def __eq__(self, other: object) -> bool:
        # the generated dataclass __eq__ would raise on numpy arrays ("truth value ambiguous")
        if not isinstance(other, Document):
            return NotImplemented
        same_image = (self.image_codes is None) == (other.image_codes is None) and (
            self.image_codes is None or np.array_equal(self.image_codes, other.image_codes)
        )
        return self.caption == other.caption and same_image and self.meta == other.meta

    @property
    def has_text(self) -> bool:
        return bool(self.caption)

    @property
    def has_image(self) -> bool:
        return self.image_codes is not None

    def to_ids(self, space: TokenSpace, encode: Encode) -> list[int]:
        return space.document_ids(encode(self.caption) if self.caption else None,
                                  self.image_codes)

    @classmethod
    def from_ids(cls, ids: Sequence[int], space: TokenSpace, decode: Decode) -> Document:
        ids = [int(t) for t in ids]
        if len(ids) < 3 or ids[0] != IMG_OPEN_ID or ids[-1] != IMG_CLOSE_ID:
            raise ValueError('a document must start with <img alt=" and end with ">')
        if ids.count(SRC_ID) != 1:
            raise ValueError('a document must contain exactly one " src="')
        s = ids.index(SRC_ID)
        text_ids, image_ids = ids[1:s], ids[s + 1 : -1]
        if not all(space.is_text(t) for t in text_ids):
            raise ValueError("non-text token inside alt")
        if not all(space.is_image(t) for t in image_ids):
            raise ValueError("non-image token inside src")
        caption = decode(space.ids_to_text(text_ids)) if text_ids else None
        codes = None
        if image_ids:
            if len(image_ids) != space.image_len:
                raise ValueError(f"src holds {len(image_ids)} codes, expected {space.image_len}")
            codes = space.ids_to_codes(image_ids).reshape(space.image_grid)
        return cls(caption=caption, image_codes=codes)

    def to_html(self, space: TokenSpace, encode: Encode, decode: Decode) -> str:
        return render_html(self.to_ids(space, encode), space, decode)

    @classmethod
    def from_html(cls, text: str, space: TokenSpace, encode: Encode, decode: Decode) -> Document:
        return cls.from_ids(parse_html(text, space, encode), space, decode)


_SPECIAL_PATTERN = "|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True))
_IMAGE_TOKEN = re.compile(r"<v[0-9]+>")  # ASCII digits only: str.isdigit also takes "٣"
_HTML_TOKEN = re.compile(rf"({_SPECIAL_PATTERN}|{_IMAGE_TOKEN.pattern})")


def render_html(ids: Sequence[int], space: TokenSpace, decode: Decode) -> str:
    """Render any token sequence to its HTML string (the inverse of `parse_html`).

    `parse_html(render_html(ids)) == ids` whenever each run of text ids is the BPE's own
    encoding of its text, as in `Document.to_ids` and `parse_html` output. A text run cut
    mid-word (e.g. by a mask) decodes to the same characters but may re-encode to other,
    equivalent ids; one cut inside a multi-byte character cannot be rendered exactly.
    """
    out: list[str] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            out.append(html.escape(decode(space.ids_to_text(run)), quote=True))
            run.clear()

    for t in ids:
        t = int(t)
        if space.is_text(t):
            run.append(t)
            continue
        flush()
        if space.is_special(t):
            out.append(SPECIAL_TOKENS[t])
        elif space.is_image(t):
            out.append(f"<v{t - space.image_offset}>")
        else:
            raise ValueError(f"token id {t} is outside the vocabulary")
    flush()
    return "".join(out)


def parse_html(text: str, space: TokenSpace, encode: Encode) -> list[int]:
    """Parse an HTML string (as produced by `render_html`) back into token ids."""
    ids: list[int] = []
    for piece in _HTML_TOKEN.split(text):
        if not piece:
            continue
        if piece in SPECIAL_IDS:
            ids.append(SPECIAL_IDS[piece])
        elif _IMAGE_TOKEN.fullmatch(piece):
            ids.extend(space.codes_to_ids([int(piece[2:-1])]))
        else:
            ids.extend(space.text_to_ids(encode(html.unescape(piece))))
    return ids


# Segment labels used by the loss: which document a token belongs to.
SEG_RETRIEVED = 1
SEG_MAIN = 2


@dataclass
class Assembled:
    ids: list[int]
    segments: list[int]  # SEG_RETRIEVED / SEG_MAIN per token


def assemble(retrieved: Sequence[list[int]], main: list[int], eos: bool = True) -> Assembled:
    """`[retrieved doc, <break>]* + main doc + <eos>` with a segment label per token: the
    one layout of documents in context, for training, serving and benchmarks.

    The `<break>` after a retrieved document belongs to the retrieved segment. `main` may
    be a prompt (the start of a document) or empty, with `eos=False`, for a context alone.
    """
    ids: list[int] = []
    seg: list[int] = []
    for doc in retrieved:
        ids += [*doc, BREAK_ID]
        seg += [SEG_RETRIEVED] * (len(doc) + 1)
    tail = [*main, EOS_ID] if eos else list(main)
    ids += tail
    seg += [SEG_MAIN] * len(tail)
    return Assembled(ids=ids, segments=seg)
