"""The demo world's vocabulary: attribute values, the judge's label heads, and types.

Attributes travel as small flat dicts (see `Attributes`), one shape per scene kind:

- object: {"kind": "object", "shape", "colour", "size", "position"}
- pair:   {"kind": "pair", "shape", "colour", "relation", "shape2", "colour2"}
          canonical form: the first object is the left one ("left of") or the top one
          ("above"), so one image has exactly one attribute dict whatever the caption says.
- entity: {"kind": "entity", "entity": "<Name>"}
"""

from __future__ import annotations

from typing import Literal

SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross", "ring", "diamond")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
SIZES: tuple[str, ...] = ("small", "big")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
# Only the canonical directions: "right of"/"below" are caption phrasings of these two.
RELATIONS: tuple[str, ...] = ("left of", "above")
KINDS: tuple[str, ...] = ("object", "pair", "entity")

Kind = Literal["object", "pair", "entity"]
Split = Literal["train", "memory", "eval"]
SPLITS: tuple[str, ...] = ("train", "memory", "eval")

# Plain dicts (not dataclasses) because they are written to JSON manifests, compared in
# tests and filled partially by the caption parser.
Attributes = dict[str, str]

IGNORE = -1  # label of a head that does not apply (e.g. size of a pair); CE ignore_index
NO_ENTITY = "none"

# The judge classifier's heads. Each label is an index into the head's list. "relation"
# has "none" so the judge also learns to count objects; shape2/colour2 describe the
# right/bottom object of a pair. The "entity" head depends on the seed's entity names and
# is added by `World.label_heads` as [NO_ENTITY, *entity names].
ATTRIBUTE_HEADS: dict[str, tuple[str, ...]] = {
    "kind": KINDS,
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "position": POSITIONS,
    "relation": ("none", *RELATIONS),
    "shape2": SHAPES,
    "colour2": COLOURS,
}
ENTITY_HEAD = "entity"
