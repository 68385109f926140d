"""The world: configuration, deterministic splits, random-access items and eval prompts."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from world import captions
from world.entities import FlagPattern, entity_names, flag_patterns
from world.render import Renderer
from world.rng import Rng, key_hash
from world.schema import (
    ATTRIBUTE_HEADS,
    COLOURS,
    ENTITY_HEAD,
    IGNORE,
    KINDS,
    NO_ENTITY,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Attributes,
)

Combo = tuple[str, str]  # (shape, colour)

# Share of each scene kind per split (object, pair, entity). The memory and eval lean on
# entities because knowledge-intensive generation is what they exist to test.
SPLIT_MIX: dict[str, tuple[float, float, float]] = {
    "train": (0.55, 0.30, 0.15),
    "memory": (0.45, 0.25, 0.30),
    "eval": (0.40, 0.20, 0.40),
}


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    image_size: int = 32  # 32x32 -> an 8x8 grid of 4x4 VQ patches
    n_train: int = 100_000  # items are drawn by index, so sizes cost nothing until read
    n_memory: int = 20_000  # the knowledge store; large enough that retrieval must search
    n_eval: int = 2_000
    n_entities: int = 64
    memory_only_fraction: float = 0.25  # entities seen only through memory (and eval)
    n_heldout_combos: int = 6  # (shape, colour) pairs never in train; one per shape
    memory_heldout_fraction: float = 0.25  # share of memory objects/pairs with a held-out combo

    def __post_init__(self) -> None:
        if min(self.n_train, self.n_memory, self.n_eval) < 0:
            raise ValueError("split sizes must be non-negative")
        if self.n_entities < 2:
            raise ValueError("n_entities must be at least 2 (one train, one memory-only)")
        if not 0 < self.memory_only_fraction < 1:
            raise ValueError("memory_only_fraction must be in (0, 1)")
        if not 1 <= self.n_heldout_combos <= min(len(SHAPES), len(COLOURS)):
            raise ValueError(f"n_heldout_combos must be in [1, {len(SHAPES)}]")
        if not 0 < self.memory_heldout_fraction < 1:
            raise ValueError("memory_heldout_fraction must be in (0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> WorldConfig:
        return cls(**d)


@dataclass
class WorldItem:
    image: np.ndarray  # uint8 (H, W, 3)
    caption: str
    attributes: Attributes
    split: str
    id: str  # "<split>:<index>"
    group: str  # seen | heldout (object, pair), train_entity | memory_entity (entity)
    variant: int  # jitter/shade index; (attributes, variant) fixes the image exactly
    template: int  # caption template index


@dataclass(frozen=True)
class EvalPrompt:
    caption: str
    attributes: Attributes
    group: str


class World:
    """A procedurally generated world of captioned images with known ground truth.

    Everything derives from `config.seed`: the entity names and flags, which entities
    are memory-only, which (shape, colour) combinations are held out, and every item.
    Items are drawn by index, so any slice of a split can be produced independently.
    """

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config or WorldConfig()
        rng = Rng.from_key("racm3-world", self.config.seed)
        names = entity_names(self.config.n_entities, rng)
        patterns = flag_patterns(self.config.n_entities, rng, self.config.image_size)
        self.entities: tuple[str, ...] = tuple(names)
        self.flags: dict[str, FlagPattern] = dict(zip(names, patterns, strict=True))
        n_entities = self.config.n_entities
        n_memory_only = round(n_entities * self.config.memory_only_fraction)
        n_memory_only = min(n_entities - 1, max(1, n_memory_only))  # keep both groups non-empty
        memory_only = set(rng.sample(names, n_memory_only))
        self.memory_only_entities = tuple(n for n in names if n in memory_only)
        self.train_entities = tuple(n for n in names if n not in memory_only)
        # One held-out colour per shape, all colours different, so every shape and every
        # colour is still seen in training, only never together.
        shapes, colours = rng.sample(SHAPES, len(SHAPES)), rng.sample(COLOURS, len(COLOURS))
        self.heldout_combos: tuple[Combo, ...] = tuple(
            sorted(list(zip(shapes, colours, strict=False))[: self.config.n_heldout_combos])
        )
        self.seen_combos: tuple[Combo, ...] = tuple(
            (s, c) for s in SHAPES for c in COLOURS if (s, c) not in self.heldout_combos
        )
        self.all_combos = self.heldout_combos + self.seen_combos
        self._heldout = set(self.heldout_combos)
        self._renderer = Renderer(
            self.config.image_size,
            {n: p.render(self.config.image_size) for n, p in self.flags.items()},
        )
        self._split_seed = {split: key_hash("racm3-split", self.config.seed, split)
                            for split in SPLITS}
        self.label_heads: dict[str, tuple[str, ...]] = {
            **ATTRIBUTE_HEADS,
            ENTITY_HEAD: (NO_ENTITY, *self.entities),
        }

    # -- splits -----------------------------------------------------------------------------

    def split_size(self, split: str) -> int:
        sizes = {"train": self.config.n_train, "memory": self.config.n_memory,
                 "eval": self.config.n_eval}
        if split not in sizes:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return sizes[split]

    def sample(self, split: str, index: int) -> WorldItem:
        if not 0 <= index < self.split_size(split):
            raise IndexError(f"index {index} out of range for split {split!r}")
        rng = Rng(self._split_seed[split] + index)
        u = rng.random()
        mix = SPLIT_MIX[split]
        if u < mix[0]:
            attrs, group = self._draw_object(rng, split)
        elif u < mix[0] + mix[1]:
            attrs, group = self._draw_pair(rng, split)
        else:
            attrs, group = self._draw_entity(rng, split)
        variant = self._draw_variant(rng, attrs, split)
        template = rng.below(captions.n_templates(attrs["kind"]))
        return WorldItem(
            image=self._renderer.render(attrs, variant),
            caption=captions.caption(attrs, template),
            attributes=attrs,
            split=split,
            id=f"{split}:{index}",
            group=group,
            variant=variant,
            template=template,
        )

    def iter_split(
        self, split: str, start: int = 0, stop: int | None = None
    ) -> Iterator[WorldItem]:
        stop = self.split_size(split) if stop is None else min(stop, self.split_size(split))
        for index in range(start, stop):
            yield self.sample(split, index)

    def owner(self, attrs: Attributes, variant: int) -> str:
        """The one split allowed to hold this exact image.

        Each scene's variants are dealt round-robin to the three splits (offset by a hash
        of the attributes), so an identical image can never occur in two splits, while
        every split still gets a third of every scene's variants.
        """
        return SPLITS[(variant + self._content_hash(attrs)) % len(SPLITS)]

    def _draw_variant(self, rng: Rng, attrs: Attributes, split: str) -> int:
        """A uniform draw among the variants `owner` deals to `split`."""
        n, k = self._renderer.n_variants(attrs), len(SPLITS)
        offset = (SPLITS.index(split) - self._content_hash(attrs)) % k
        return k * rng.below((n - offset + k - 1) // k) + offset

    @staticmethod
    def _content_hash(attrs: Attributes) -> int:
        return zlib.crc32("|".join(f"{k}={attrs[k]}" for k in sorted(attrs)).encode())

    # -- content ----------------------------------------------------------------------------

    def _combos_for(self, rng: Rng, split: str) -> tuple[Combo, ...]:
        if split == "train":
            return self.seen_combos
        if split == "eval" or rng.random() < self.config.memory_heldout_fraction:
            return self.heldout_combos
        return self.seen_combos

    def _draw_object(self, rng: Rng, split: str) -> tuple[Attributes, str]:
        shape, colour = rng.choice(self._combos_for(rng, split))
        attrs = {"kind": "object", "shape": shape, "colour": colour,
                 "size": rng.choice(SIZES), "position": rng.choice(POSITIONS)}
        return attrs, "heldout" if (shape, colour) in self._heldout else "seen"

    def _draw_pair(self, rng: Rng, split: str) -> tuple[Attributes, str]:
        pool = self._combos_for(rng, split)
        first = rng.choice(pool)
        # A held-out pair needs one held-out object; its partner may be anything.
        partners = self.all_combos if pool is self.heldout_combos else self.seen_combos
        second = rng.choice(partners)
        while second == first:  # identical objects would make the relation ambiguous
            second = rng.choice(partners)
        if rng.random() < 0.5:
            first, second = second, first
        attrs = {"kind": "pair", "shape": first[0], "colour": first[1],
                 "relation": rng.choice(RELATIONS), "shape2": second[0], "colour2": second[1]}
        heldout = first in self._heldout or second in self._heldout
        return attrs, "heldout" if heldout else "seen"

    def _draw_entity(self, rng: Rng, split: str) -> tuple[Attributes, str]:
        if split == "train":
            pool = self.train_entities
        elif split == "memory":
            pool = self.entities
        else:
            pool = self.memory_only_entities if rng.random() < 0.5 else self.train_entities
        name = rng.choice(pool)
        return {"kind": "entity", "entity": name}, self._entity_group(name)

    def _entity_group(self, name: str) -> str:
        return "memory_entity" if name in self.memory_only_entities else "train_entity"

    # -- rendering and captions -------------------------------------------------------------

    def render(self, attributes: Attributes, variant: int | None = None) -> np.ndarray:
        """Render an attribute dict; `variant=None` gives the canonical (unjittered) image."""
        self.validate(attributes)
        if variant is None:
            variant = self._renderer.canonical_variant(attributes)
        return self._renderer.render(attributes, variant)

    def caption(self, attributes: Attributes, template_index: int = 0) -> str:
        self.validate(attributes)
        return captions.caption(attributes, template_index)

    def validate(self, attributes: Attributes) -> None:
        """Raise ValueError unless `attributes` is a complete, canonical scene of this world."""
        kind = attributes.get("kind")
        expected = {
            "object": {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS},
            "pair": {"shape": SHAPES, "colour": COLOURS, "relation": RELATIONS,
                     "shape2": SHAPES, "colour2": COLOURS},
            "entity": {"entity": self.entities},
        }.get(kind)
        if expected is None:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        if set(attributes) != {"kind", *expected}:
            raise ValueError(f"{kind} attributes must be exactly {sorted(expected)}")
        for key, values in expected.items():
            if attributes[key] not in values:
                raise ValueError(f"unknown {key} {attributes[key]!r}")
        if kind == "pair" and (attributes["shape"], attributes["colour"]) == (
            attributes["shape2"], attributes["colour2"]
        ):
            raise ValueError("the two objects of a pair must differ in shape or colour")

    # -- judge labels -----------------------------------------------------------------------

    def attributes_of(self, item: WorldItem | Attributes) -> dict[str, int]:
        """Integer label per head of `label_heads`; IGNORE where a head does not apply."""
        attrs = item.attributes if isinstance(item, WorldItem) else item
        self.validate(attrs)
        labels = dict.fromkeys(self.label_heads, IGNORE)
        labels["kind"] = KINDS.index(attrs["kind"])
        labels[ENTITY_HEAD] = self.label_heads[ENTITY_HEAD].index(attrs.get("entity", NO_ENTITY))
        if attrs["kind"] == "object":
            labels["relation"] = 0  # "none": a single object
        for head, values in ATTRIBUTE_HEADS.items():
            if head in attrs and head != "kind":
                labels[head] = values.index(attrs[head])
        return labels

    def attributes_from_labels(self, labels: Mapping[str, int]) -> Attributes:
        """Inverse of `attributes_of`: turn (predicted) labels back into an attribute dict."""
        kind = KINDS[labels["kind"]]
        if kind == "entity":
            return {"kind": kind, "entity": self.label_heads[ENTITY_HEAD][labels[ENTITY_HEAD]]}
        keys = (("shape", "colour", "size", "position") if kind == "object"
                else ("shape", "colour", "relation", "shape2", "colour2"))
        return {"kind": kind, **{k: self.label_heads[k][labels[k]] for k in keys}}

    # -- evaluation prompts -----------------------------------------------------------------

    def eval_prompts(self, kind: str, template_index: int = 0) -> list[EvalPrompt]:
        """Deterministic caption->image prompts with their ground-truth attributes.

        - "object": every held-out combo x size x position (group "heldout"), then as many
          seen-combo prompts drawn from the seed (group "seen");
        - "pair": each held-out combo in each relation and slot with a seeded partner
          (group "heldout"), then as many seen pairs (group "seen");
        - "entity": every entity (group "memory_entity" or "train_entity").
        """
        rng = Rng.from_key("racm3-prompts", self.config.seed, kind)
        if kind == "object":
            scenes = [{"kind": "object", "shape": s, "colour": c, "size": z, "position": p}
                      for s, c in self.heldout_combos for z in SIZES for p in POSITIONS]
            seen = [{"kind": "object", "shape": s, "colour": c, "size": z, "position": p}
                    for s, c in self.seen_combos for z in SIZES for p in POSITIONS]
            scenes += rng.sample(seen, len(scenes))
        elif kind == "pair":
            scenes = []
            for combo in self.heldout_combos:
                for relation in RELATIONS:
                    for slot in (0, 1):
                        partner = rng.choice([c for c in self.seen_combos if c != combo])
                        scenes.append(self._pair(combo, partner, relation, slot))
            for _ in range(len(scenes)):
                a, b = rng.sample(self.seen_combos, 2)
                scenes.append(self._pair(a, b, rng.choice(RELATIONS), 0))
        elif kind == "entity":
            scenes = [{"kind": "entity", "entity": n} for n in self.entities]
        else:
            raise ValueError(f"unknown prompt kind {kind!r}; expected one of {KINDS}")
        return [EvalPrompt(captions.caption(a, template_index), a, self.group_of(a))
                for a in scenes]

    @staticmethod
    def _pair(combo: Combo, partner: Combo, relation: str, slot: int) -> Attributes:
        first, second = (combo, partner) if slot == 0 else (partner, combo)
        return {"kind": "pair", "shape": first[0], "colour": first[1], "relation": relation,
                "shape2": second[0], "colour2": second[1]}

    def group_of(self, attributes: Attributes) -> str:
        kind = attributes["kind"]
        if kind == "entity":
            return self._entity_group(attributes["entity"])
        combos = [(attributes["shape"], attributes["colour"])]
        if kind == "pair":
            combos.append((attributes["shape2"], attributes["colour2"]))
        return "heldout" if any(c in self._heldout for c in combos) else "seen"
