"""Captions: templates that write attributes as text, and the parser that reads them back.

Every template of a kind names every attribute of that kind, so
`parse_caption(caption(attrs, t)) == attrs` for every template `t`. Pair templates say
the relation in both directions ("a red circle left of a blue ring", "a blue ring right
of a red circle", "a blue ring with a red circle on its left"); the parser returns the
canonical form (first object = left/top one).

The parser is keyword based, so it also scores free-form generated captions: it returns
whatever attributes it can find (a partial dict, possibly just {"kind": "object"}, or {}
when it finds nothing).
"""

from __future__ import annotations

import re

from world.schema import COLOURS, POSITIONS, SHAPES, SIZES, Attributes

_WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": (
        "a {size} {colour} {shape} {where}",
        "there is a {size} {colour} {shape} {where}",
        "a picture of a {size} {colour} {shape} {where}",
        "{where} there is a {size} {colour} {shape}",
        "a {shape} that is {size} and {colour}, {where}",
        "a {size} {shape} in {colour} {where}",
    ),
    # {a}: the left/top object, {b}: the right/bottom one; one phrasing list per relation,
    # aligned so that template i exists for both relations.
    "pair:left of": (
        "a {a} left of a {b}",
        "a {b} right of a {a}",
        "there is a {a} to the left of a {b}",
        "a {b} to the right of a {a}",
        "a {b} with a {a} on its left",
    ),
    "pair:above": (
        "a {a} above a {b}",
        "a {b} below a {a}",
        "there is a {a} on top of a {b}",
        "a {b} under a {a}",
        "a {b} with a {a} above it",
    ),
    "entity": (
        "the flag of {entity}",
        "a picture of the flag of {entity}",
        "{entity}'s flag",
        "the national flag of {entity}",
        "the {entity} flag",
    ),
}


def n_templates(kind: str) -> int:
    return len(TEMPLATES["pair:left of" if kind == "pair" else kind])


def caption(attrs: Attributes, template_index: int = 0) -> str:
    kind = attrs["kind"]
    if not 0 <= template_index < n_templates(kind):
        raise ValueError(f"template_index {template_index} out of range for kind {kind!r}")
    if kind == "object":
        text = TEMPLATES["object"][template_index].format(
            size=attrs["size"], colour=attrs["colour"], shape=attrs["shape"],
            where=_WHERE[attrs["position"]],
        )
    elif kind == "pair":
        text = TEMPLATES[f"pair:{attrs['relation']}"][template_index].format(
            a=f"{attrs['colour']} {attrs['shape']}", b=f"{attrs['colour2']} {attrs['shape2']}"
        )
    elif kind == "entity":
        text = TEMPLATES["entity"][template_index].format(entity=attrs["entity"])
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return _A_BEFORE_VOWEL.sub("an ", text)


_A_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")

# --- parsing ---------------------------------------------------------------------------

_SHAPE = "|".join(SHAPES)
_COLOUR = "|".join(COLOURS)
_SIZE = "|".join(SIZES)
_MENTION = re.compile(rf"\b(?:({_SIZE})\s+)?(?:({_COLOUR})\s+)?({_SHAPE})s?\b")
_ENTITY = (
    re.compile(r"\bflag of ([a-z]+)"),
    re.compile(r"\b([a-z]+)'s flag\b"),
    re.compile(r"\bthe ([a-z]+) flag\b"),
)
_POSITION_WORDS = {**{p: p for p in POSITIONS}, "centre": "center", "middle": "center"}
_POSITION = re.compile(r"\b(" + "|".join(_POSITION_WORDS) + r")\b")
_WITH_SIDE = re.compile(r"\bon its (left|right)\b")
_WITH_VERTICAL = re.compile(r"\b(above|over|below|under|beneath) it\b")
_ABOVE = re.compile(r"\b(above|over|on top of)\b")
_BELOW = re.compile(r"\b(below|under|underneath|beneath)\b")


def parse_caption(text: str) -> Attributes:
    """Recover attributes from a caption of any template (or a partial dict from free text)."""
    t = " ".join(text.lower().split())
    if re.search(r"\bflag\b", t):
        for pattern in _ENTITY:
            m = pattern.search(t)
            if m and m.group(1) not in ("national", "a", "the"):
                return {"kind": "entity", "entity": m.group(1).capitalize()}
        return {"kind": "entity"}
    mentions = list(_MENTION.finditer(t))
    if len(mentions) >= 2:
        return _parse_pair(t, mentions[0], mentions[1])
    if not mentions:
        return {}
    out: Attributes = {"kind": "object", "shape": mentions[0].group(3)}
    # Object templates may put size and colour anywhere ("a square that is big and blue").
    for key, vocabulary in (("colour", COLOURS), ("size", SIZES)):
        m = re.search(r"\b(" + "|".join(vocabulary) + r")\b", t)
        if m:
            out[key] = m.group(1)
    m = _POSITION.search(t)
    if m:
        out["position"] = _POSITION_WORDS[m.group(1)]
    return out


def _parse_pair(t: str, first: re.Match, second: re.Match) -> Attributes:
    # Which mention is the canonical first (left/top) object depends on the phrasing.
    relation, second_is_first = None, False
    if m := _WITH_SIDE.search(t):  # "a B with an A on its left"
        relation, second_is_first = "left of", m.group(1) == "left"
    elif m := _WITH_VERTICAL.search(t):  # "a B with an A above it"
        relation, second_is_first = "above", m.group(1) in ("above", "over")
    elif "left of" in t:
        relation = "left of"
    elif "right of" in t:
        relation, second_is_first = "left of", True
    elif _ABOVE.search(t):
        relation = "above"
    elif _BELOW.search(t):
        relation, second_is_first = "above", True
    a, b = (second, first) if second_is_first else (first, second)
    out: Attributes = {"kind": "pair", "shape": a.group(3), "shape2": b.group(3)}
    if relation:
        out["relation"] = relation
    if a.group(2):
        out["colour"] = a.group(2)
    if b.group(2):
        out["colour2"] = b.group(2)
    return out
