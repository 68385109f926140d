"""The demo world: procedurally generated captioned images with exactly known ground truth.

No pretrained weights can be downloaded where racm3 is built, so the project trains and
evaluates its own small bundle on this world (docs/architecture.md, "The demo world").

Scenes (32x32 RGB by default, dark grey background; see `render` for the geometry):
- **object**: one shape (square, circle, triangle, cross, ring, diamond) in one of 8
  colours, small (12 px) or big (18 px), at left / right / top / bottom / center;
- **pair**: two small objects side by side ("left of") or stacked ("above"). Attributes
  are canonical: the first object is the left/top one; captions phrase it either way;
- **entity**: "the flag of Veloria", a full-image flag (stripes, quadrants, crosses...)
  fixed per invented name. Any two flags differ on >= 25% of their pixels.

Captions come from several templates per kind; `parse_caption` reads any of them back
(and returns partial attributes for free-form text, to score generated captions).

Splits, all deterministic from `WorldConfig.seed`:
- **train**: objects and pairs built only from *seen* (shape, colour) combinations, and
  the *train entities*;
- **memory** (the retrieval store): everything: seen combos, the *held-out* combos
  (`memory_heldout_fraction` of objects/pairs), train entities and the *memory-only
  entities*. Retrieval is the only way the model can meet the latter two;
- **eval**: objects and pairs with a held-out combo (never in train) and entities, half
  memory-only, half train (a control). `WorldItem.group` tells which.

Held-out combos are one colour per shape, all colours different, so each shape and each
colour still occurs in training, only never together.

Disjointness: a scene's jitter (position, background shade, colour shade, flag tint) is
one integer, its variant. The variants of every scene are dealt round-robin to the three
splits (`World.owner`), so an identical image never occurs in two splits, and every
split still sees every scene it is allowed in a third of the variants.

Items are drawn by index from a generator seeded with (seed, split, index): any slice of
any split is produced independently and the memory can be streamed. Rendering is a
precomputed mask pasted onto a filled array, so it costs microseconds per image.

The judge's label schema is `World.label_heads` (ATTRIBUTE_HEADS plus an "entity" head);
`World.attributes_of` gives integer labels with IGNORE (-1) for heads that do not apply.
"""

from world.captions import TEMPLATES, caption, n_templates, parse_caption
from world.grid import make_grid, save_grid
from world.render import PALETTE
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
from world.world import EvalPrompt, World, WorldConfig, WorldItem

__all__ = [
    "ATTRIBUTE_HEADS",
    "COLOURS",
    "ENTITY_HEAD",
    "IGNORE",
    "KINDS",
    "NO_ENTITY",
    "PALETTE",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TEMPLATES",
    "Attributes",
    "EvalPrompt",
    "World",
    "WorldConfig",
    "WorldItem",
    "caption",
    "make_grid",
    "n_templates",
    "parse_caption",
    "save_grid",
]
