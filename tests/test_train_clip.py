"""CLIP trains from scratch on the world with open_clip's ClipLoss: the loss falls and
retrieval leaves chance within a smoke budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.clip import ClipEncoder
from training.train_clip import (
    ClipTrainConfig,
    InventedNames,
    WorldPairs,
    recall_at_1,
    train_clip,
    world_heldout,
)
from world import World, WorldConfig, parse_caption

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(seed=5, n_train=4000, n_memory=500, n_eval=300, n_entities=16))


def test_smoke_training_lowers_the_loss_and_beats_chance(world: World) -> None:
    # A smoke budget (~12 CPU-seconds): 24 steps of 32 pairs.
    torch.manual_seed(0)
    encoder = ClipEncoder.create()
    records: list[dict] = []
    config = ClipTrainConfig(steps=24, batch_size=32, n_heldout=64, log_every=4, name_pairs=16)
    history = train_clip(encoder, world, config=config, progress=False, log=records.append)
    chance = history.before["chance"]
    assert chance == pytest.approx(1 / 64)
    assert history.losses[-1] < history.losses[0] - 0.5, history.losses
    assert history.after["t2i_r1"] >= 4 * chance, history.after
    assert history.after["t2i_r1"] > history.before["t2i_r1"]
    assert {"entity_t2i_r1", "memory_entity_doc_r1", "heldout_combo_t2i_r1"} <= set(
        history.after)
    assert [r["step"] for r in records] == history.steps
    assert len(history.name_losses) == len(history.losses) and "name_loss" in records[-1]
    assert all(0 < s <= 100.0 + 1e-4 for s in history.logit_scales)


def test_world_heldout_pairs_are_distinct_and_never_trained_on(world: World) -> None:
    images, captions = world_heldout(world, 64)
    assert images.shape == (64, 32, 32, 3) and len(set(captions)) == 64
    pairs = iter(WorldPairs(world, batch_size=96, seed=0))
    batch_images, batch_captions = next(pairs)
    assert batch_images.shape == (96, 32, 32, 3) and batch_images.dtype == np.uint8
    # one image per scene: captions of different templates still parse to distinct scenes
    scenes = {tuple(sorted(parse_caption(c).items())) for c in batch_captions}
    assert len(scenes) == 96
    train_images = {it.image.tobytes() for it in world.iter_split("train")}
    assert not any(im.tobytes() in train_images for im in images)


def test_invented_names_are_new_and_pair_two_templates_of_one_name(world: World) -> None:
    names = InventedNames(world, 500, seed=0)
    assert len(set(names.names)) == 500 and not set(names.names) & set(world.entities)
    first, second = names.batch(64)
    for a, b in zip(first, second, strict=True):
        assert a != b and parse_caption(a) == parse_caption(b)
        assert parse_caption(a)["entity"] in names.names
    assert len({parse_caption(a)["entity"] for a in first}) == 64  # no name twice in a batch


def test_generic_pairs_hold_out_the_first_pairs(world: World) -> None:
    items = list(world.iter_split("train", 0, 16 * 12))
    consumed: list[int] = []

    def batches():
        for b in range(12):
            consumed.append(b)
            chunk = items[16 * b : 16 * (b + 1)]
            yield np.stack([it.image for it in chunk]), [it.caption for it in chunk]

    encoder = ClipEncoder.create()
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    history = train_clip(encoder, batches(), steps=3, lr=1e-3,
                         config=ClipTrainConfig(n_heldout=32, log_every=1),
                         progress=False)
    # two batches make the 32 held-out pairs, then one batch per step
    assert consumed == [0, 1, 2, 3, 4]
    assert history.steps == [1, 2, 3] and set(history.after) == {"t2i_r1", "i2t_r1", "chance"}
    after = encoder.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_recall_at_1_is_perfect_for_a_matching_toy_encoder(world: World) -> None:
    class Identity:  # embeddings that match exactly: recall must be 1
        def encode_text(self, texts):
            return np.eye(len(texts), dtype=np.float32)

        def encode_image(self, images):
            return np.eye(len(images), dtype=np.float32)

    r = recall_at_1(Identity(), np.zeros((5, 32, 32, 3), np.uint8), ["a"] * 5)
    assert r == {"t2i_r1": 1.0, "i2t_r1": 1.0, "chance": 0.2}
