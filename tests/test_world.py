"""The demo world: determinism, split hygiene, caption round-trips and legible pixels."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from world import (
    ATTRIBUTE_HEADS,
    COLOURS,
    IGNORE,
    PALETTE,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    TEMPLATES,
    World,
    WorldConfig,
    n_templates,
    parse_caption,
    save_grid,
)
from world.entities import MIN_FLAG_DIFFERENCE

SMALL = WorldConfig(seed=7, n_train=4000, n_memory=4000, n_eval=2000)


@pytest.fixture(scope="module")
def world() -> World:
    return World(SMALL)


@pytest.fixture(scope="module")
def items(world: World) -> dict[str, list]:
    return {split: list(world.iter_split(split)) for split in SPLITS}


def _objects(attrs_list):
    for a in attrs_list:
        if a["kind"] == "object":
            yield (a["shape"], a["colour"])
        elif a["kind"] == "pair":
            yield (a["shape"], a["colour"])
            yield (a["shape2"], a["colour2"])


# --- determinism -----------------------------------------------------------------------


def test_same_seed_gives_identical_items(world: World) -> None:
    again = World(SMALL)
    assert again.entities == world.entities
    assert again.heldout_combos == world.heldout_combos
    for split in SPLITS:
        for i in (0, 1, 17, 999):
            a, b = world.sample(split, i), again.sample(split, i)
            assert a.caption == b.caption and a.attributes == b.attributes
            np.testing.assert_array_equal(a.image, b.image)


def test_different_seed_gives_a_different_world(world: World) -> None:
    other = World(WorldConfig(seed=8, n_train=4000, n_memory=4000, n_eval=2000))
    assert set(other.entities) != set(world.entities)
    differing = sum(
        world.sample("train", i).caption != other.sample("train", i).caption
        or not np.array_equal(world.sample("train", i).image, other.sample("train", i).image)
        for i in range(200)
    )
    assert differing > 190


def test_random_access_matches_streaming(world: World, items) -> None:
    for i in (0, 5, 1234):
        item = world.sample("memory", i)
        assert item.id == f"memory:{i}" == items["memory"][i].id
        assert item.caption == items["memory"][i].caption
        np.testing.assert_array_equal(item.image, items["memory"][i].image)
    assert [it.id for it in world.iter_split("eval", 10, 13)] == ["eval:10", "eval:11", "eval:12"]
    with pytest.raises(IndexError):
        world.sample("eval", SMALL.n_eval)


def test_items_are_well_formed(world: World, items) -> None:
    for split in SPLITS:
        assert len(items[split]) == world.split_size(split)
        for item in items[split][:500]:
            assert item.image.shape == (32, 32, 3) and item.image.dtype == np.uint8
            assert item.split == split
            world.validate(item.attributes)


# --- splits ----------------------------------------------------------------------------


def test_no_image_is_shared_between_splits(world: World, items) -> None:
    seen: dict[bytes, str] = {}
    for split in SPLITS:
        for item in items[split]:
            assert world.owner(item.attributes, item.variant) == split
            key = item.image.tobytes()
            assert seen.setdefault(key, split) == split, f"{item.id} duplicates {seen[key]}"


def test_heldout_combos_never_in_train_but_in_memory_and_eval(world: World, items) -> None:
    heldout = set(world.heldout_combos)
    assert len(heldout) == SMALL.n_heldout_combos
    # every shape and every colour is still seen in training, only not these pairings
    assert {s for s, _ in world.seen_combos} == set(SHAPES)
    assert {c for _, c in world.seen_combos} == set(COLOURS)
    train_objects = set(_objects(it.attributes for it in items["train"]))
    assert not train_objects & heldout
    assert heldout <= set(_objects(it.attributes for it in items["memory"]))
    for item in items["eval"]:
        if item.attributes["kind"] != "entity":
            assert item.group == "heldout"
            assert set(_objects([item.attributes])) & heldout


def test_memory_only_entities_never_in_train(world: World, items) -> None:
    memory_only = set(world.memory_only_entities)
    assert memory_only and not memory_only & set(world.train_entities)
    assert len(memory_only) == round(SMALL.n_entities * SMALL.memory_only_fraction)

    def entities(split: str) -> set[str]:
        return {it.attributes["entity"] for it in items[split] if it.attributes["kind"] == "entity"}

    assert not entities("train") & memory_only
    assert entities("memory") == set(world.entities)
    assert entities("eval") & memory_only and entities("eval") & set(world.train_entities)


# --- captions --------------------------------------------------------------------------


def _all_scenes(world: World):
    for shape, colour, size, position in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS):
        yield {"kind": "object", "shape": shape, "colour": colour, "size": size,
               "position": position}
    combos = list(itertools.product(SHAPES, COLOURS))
    for a, b in itertools.permutations(combos, 2):
        for relation in RELATIONS:
            yield {"kind": "pair", "shape": a[0], "colour": a[1], "relation": relation,
                   "shape2": b[0], "colour2": b[1]}
    for name in world.entities:
        yield {"kind": "entity", "entity": name}


def test_every_template_round_trips_every_scene(world: World) -> None:
    n = 0
    for attrs in _all_scenes(world):
        for t in range(n_templates(attrs["kind"])):
            text = world.caption(attrs, t)
            assert parse_caption(text) == attrs, text
            n += 1
    assert n > 20_000
    assert n_templates("object") >= 5 and n_templates("pair") >= 5 and n_templates("entity") >= 3
    assert len(TEMPLATES["pair:left of"]) == len(TEMPLATES["pair:above"])


def test_captions_are_grammatical_and_sampled_captions_parse(world: World, items) -> None:
    orange = {"kind": "object", "shape": "ring", "colour": "orange", "size": "big",
              "position": "top"}
    assert world.caption(orange, 0) == "a big orange ring at the top"
    assert world.caption(orange, 5).startswith("a big ring in orange")
    pair = {"kind": "pair", "shape": "circle", "colour": "orange", "relation": "left of",
            "shape2": "square", "colour2": "blue"}
    assert world.caption(pair, 0) == "an orange circle left of a blue square"
    assert world.caption(pair, 1) == "a blue square right of an orange circle"
    for split in SPLITS:
        for item in items[split][:300]:
            assert parse_caption(item.caption) == item.attributes


def test_parser_returns_partial_attributes_for_free_text() -> None:
    assert parse_caption("A RED circle") == {"kind": "object", "shape": "circle", "colour": "red"}
    assert parse_caption("big   cyan ring in the centre") == {
        "kind": "object", "shape": "ring", "colour": "cyan", "size": "big", "position": "center"}
    assert parse_caption("a flag") == {"kind": "entity"}
    assert parse_caption("something else entirely") == {}
    assert parse_caption("a square under a circle") == {
        "kind": "pair", "shape": "circle", "relation": "above", "shape2": "square"}


# --- pixels ----------------------------------------------------------------------------


def _object_pixels(img: np.ndarray) -> np.ndarray:
    background = img[0, 0]  # corners are always background in object scenes
    return np.any(img != background, axis=-1)


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(PALETTE, key=lambda c: float(np.sum((np.array(PALETTE[c]) - rgb) ** 2)))


def _check_object(img: np.ndarray, attrs: dict) -> None:
    mask = _object_pixels(img)
    ys, xs = np.nonzero(mask)
    h = img.shape[0]
    assert _nearest_colour(img[mask].mean(axis=0)) == attrs["colour"]
    # the centroid lies in the named half...
    cy, cx = ys.mean(), xs.mean()
    in_half = {"left": cx < h / 2, "right": cx > h / 2, "top": cy < h / 2, "bottom": cy > h / 2,
               "center": True}
    assert in_half[attrs["position"]], (attrs, cy, cx)
    # ...and the bounding-box centre (a triangle's mass sits low) is well away from the
    # other positions
    by, bx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    off_y, off_x = (by - h / 2) / h, (bx - h / 2) / h
    mid = 0.08  # jitter is at most 1/16 of the side
    expected = {"left": off_x < -0.15 and abs(off_y) < mid,
                "right": off_x > 0.15 and abs(off_y) < mid,
                "top": off_y < -0.15 and abs(off_x) < mid,
                "bottom": off_y > 0.15 and abs(off_x) < mid,
                "center": abs(off_x) < mid and abs(off_y) < mid}
    assert expected[attrs["position"]], (attrs, by, bx)


def test_objects_show_their_colour_position_and_size(world: World) -> None:
    areas = {}
    for shape, colour, size, position in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS):
        attrs = {"kind": "object", "shape": shape, "colour": colour, "size": size,
                 "position": position}
        _check_object(world.render(attrs), attrs)
        areas[shape, size] = _object_pixels(world.render(attrs)).sum()
    for shape in SHAPES:
        assert areas[shape, "big"] > 2 * areas[shape, "small"]
    # the largest small object is still clearly smaller than the smallest big one
    assert max(areas[s, "small"] for s in SHAPES) < min(areas[s, "big"] for s in SHAPES)


def test_jittered_samples_keep_their_attributes(world: World, items) -> None:
    checked = 0
    for item in items["train"] + items["eval"]:
        if item.attributes["kind"] == "object":
            _check_object(item.image, item.attributes)
            checked += 1
    assert checked > 1000


def test_shapes_have_distinct_silhouettes(world: World) -> None:
    for size in SIZES:
        masks = {s: _object_pixels(world.render({"kind": "object", "shape": s, "colour": "red",
                                                 "size": size, "position": "center"}))
                 for s in SHAPES}
        for a, b in itertools.combinations(SHAPES, 2):
            assert (masks[a] != masks[b]).sum() >= 12, (size, a, b)


def test_pairs_place_the_first_object_left_or_above(world: World) -> None:
    attrs = {"kind": "pair", "shape": "circle", "colour": "red", "relation": "left of",
             "shape2": "square", "colour2": "blue"}
    for relation in RELATIONS:
        img = world.render({**attrs, "relation": relation})
        red = np.all(img == PALETTE["red"], axis=-1)
        blue = np.all(img == PALETTE["blue"], axis=-1)
        (ry, rx), (by, bx) = np.argwhere(red).mean(0), np.argwhere(blue).mean(0)
        if relation == "left of":
            assert rx < 16 < bx and abs(ry - by) < 4
        else:
            assert ry < 16 < by and abs(rx - bx) < 4


def test_flags_are_distinct_and_fixed_per_entity(world: World, items) -> None:
    flags = {n: world.render({"kind": "entity", "entity": n}).astype(int) for n in world.entities}
    for a, b in itertools.combinations(world.entities, 2):
        differ = np.abs(flags[a] - flags[b]).max(axis=-1) > 40
        assert differ.mean() >= MIN_FLAG_DIFFERENCE, (a, b)
    for item in items["memory"][:500]:
        if item.attributes["kind"] == "entity":
            # tint jitter only: every pixel stays within 9 of the canonical flag
            assert np.abs(item.image.astype(int) - flags[item.attributes["entity"]]).max() <= 9


def test_larger_images_scale_the_geometry() -> None:
    world = World(WorldConfig(seed=1, image_size=64, n_train=300, n_memory=10, n_eval=10))
    for item in world.iter_split("train"):
        assert item.image.shape == (64, 64, 3)
        if item.attributes["kind"] == "object":
            _check_object(item.image, item.attributes)


# --- labels, prompts, validation, grids ------------------------------------------------


def test_labels_round_trip_and_mark_unused_heads(world: World, items) -> None:
    heads = world.label_heads
    assert {k: heads[k] for k in ATTRIBUTE_HEADS} == ATTRIBUTE_HEADS
    assert heads["entity"] == ("none", *world.entities)
    for item in items["eval"][:400]:
        labels = world.attributes_of(item)
        assert set(labels) == set(heads)
        assert all(-1 <= v < len(heads[k]) for k, v in labels.items())
        assert world.attributes_from_labels(labels) == item.attributes
        kind = item.attributes["kind"]
        assert (labels["entity"] == 0) == (kind != "entity")
        assert (labels["size"] == IGNORE) == (kind != "object")
        assert (labels["shape2"] == IGNORE) == (kind != "pair")
        if kind == "object":
            assert heads["relation"][labels["relation"]] == "none"


def test_eval_prompts(world: World) -> None:
    objects = world.eval_prompts("object")
    heldout = [p for p in objects if p.group == "heldout"]
    assert len(heldout) == SMALL.n_heldout_combos * len(SIZES) * len(POSITIONS)
    assert len(objects) == 2 * len(heldout)
    pairs = world.eval_prompts("pair")
    assert {p.group for p in pairs} == {"heldout", "seen"}
    entities = world.eval_prompts("entity", template_index=2)
    assert [p.attributes["entity"] for p in entities] == list(world.entities)
    assert {p.group for p in entities} == {"memory_entity", "train_entity"}
    for prompt in objects + pairs + entities:
        assert parse_caption(prompt.caption) == prompt.attributes
        assert world.group_of(prompt.attributes) == prompt.group
    assert objects == world.eval_prompts("object")
    with pytest.raises(ValueError):
        world.eval_prompts("nonsense")


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "object", "shape": "hexagon", "colour": "red", "size": "big", "position": "left"},
        {"kind": "object", "shape": "circle", "colour": "red", "size": "big"},
        {"kind": "pair", "shape": "circle", "colour": "red", "relation": "right of",
         "shape2": "ring", "colour2": "red"},
        {"kind": "pair", "shape": "circle", "colour": "red", "relation": "above",
         "shape2": "circle", "colour2": "red"},
        {"kind": "entity", "entity": "Atlantis"},
        {"kind": "dragon"},
    ],
)
def test_invalid_attributes_are_rejected(world: World, bad: dict) -> None:
    with pytest.raises(ValueError):
        world.render(bad)


def test_config_round_trips_and_validates() -> None:
    assert WorldConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ValueError):
        WorldConfig(memory_only_fraction=1.0)
    with pytest.raises(ValueError):
        WorldConfig(n_heldout_combos=0)


def test_save_grid_writes_a_png(world: World, tmp_path) -> None:
    images = [world.sample("memory", i).image for i in range(10)]
    path = save_grid(images, tmp_path / "grid.png", nrow=4, scale=2, pad=2)
    with Image.open(path) as png:
        # 4 columns, 3 rows of 32 px with 2 px padding, enlarged twice
        assert png.size == ((4 * 34 + 2) * 2, (3 * 34 + 2) * 2)
        grid = np.asarray(png.convert("RGB"))
    np.testing.assert_array_equal(grid[4:68:2, 4:68:2], images[0])
