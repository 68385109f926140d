"""The judge learns the world's attributes from renders, and round-trips through safetensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evaluation.judge import (
    Judge,
    JudgeConfig,
    JudgeHistory,
    JudgeTrainConfig,
    SceneSampler,
    train_judge,
)
from world import IGNORE, World, WorldConfig


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(seed=3, n_train=1000, n_memory=1000, n_eval=300, n_entities=16))


@pytest.fixture(scope="module")
def trained(world: World, one_thread) -> tuple[Judge, JudgeHistory, list[dict]]:
    config = JudgeTrainConfig(steps=150, batch_size=32, lr=3e-3, warmup_steps=10, n_eval=300,
                              log_every=50)
    records: list[dict] = []
    judge, history = train_judge(world, config=config, progress=False, log=records.append)
    return judge, history, records


def test_short_training_learns_colour_and_shape(trained) -> None:
    judge, history, records = trained
    acc = history.eval_accuracy
    assert history.n_eval == 300
    assert acc["colour"] >= 0.9, acc
    assert acc["kind"] >= 0.9, acc
    assert history.losses[-1] < history.losses[0] / 3
    assert [r["step"] for r in records] == [50, 100, 150]


def test_sampler_never_renders_an_eval_owned_image(world: World) -> None:
    sampler = SceneSampler(world, seed=0, kind_mix=(1, 1, 1))
    images, labels = sampler.batch(200)
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8
    eval_images = {item.image.tobytes() for item in world.iter_split("eval")}
    assert not any(im.tobytes() in eval_images for im in images)
    # heads that do not apply carry IGNORE: a pair has no size, an object no shape2
    pairs = labels["kind"] == 1
    assert (labels["size"][pairs] == IGNORE).all() and (labels["shape2"][~pairs] == IGNORE).all()


def test_predict_attributes_speaks_the_world_schema(world: World, trained) -> None:
    judge = trained[0]
    items = list(world.iter_split("eval", 0, 50))
    predicted = judge.predict_attributes(np.stack([it.image for it in items]), world)
    assert all(p["kind"] in ("object", "pair", "entity") for p in predicted)
    right = [p["kind"] == it.attributes["kind"] for p, it in zip(predicted, items, strict=True)]
    assert sum(right) >= 45
    other = World(WorldConfig(seed=4, n_entities=8))
    with pytest.raises(ValueError):
        judge.predict_attributes(items[0].image[None], other)


def test_float_tensor_images_give_the_same_predictions(world: World, trained) -> None:
    judge = trained[0]
    images = np.stack([it.image for it in world.iter_split("eval", 0, 40)])
    as_tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    for head, labels in judge.predict(images).items():
        np.testing.assert_array_equal(labels, judge.predict(as_tensor)[head])
    with pytest.raises(ValueError):
        judge.predict(images.astype(np.float32))


def test_save_load_round_trip(tmp_path, world: World, trained) -> None:
    judge = trained[0]
    judge.save(tmp_path)
    assert (tmp_path / "judge.safetensors").is_file()
    meta = json.loads((tmp_path / "judge.json").read_text())
    assert meta["config"]["heads"]["entity"][1:] == list(world.entities)
    loaded = Judge.load(tmp_path)
    images = np.stack([it.image for it in world.iter_split("eval", 0, 64)])
    before, after = judge.predict(images), loaded.predict(images)
    for head in before:
        np.testing.assert_array_equal(before[head], after[head])
    np.testing.assert_allclose(judge.features(images), loaded.features(images), atol=1e-6)
    assert judge.features(images).shape == (64, judge.config.feature_dim)


def test_untrained_judge_shapes() -> None:
    judge = Judge(JudgeConfig(heads={"kind": ["a", "b"], "colour": ["r", "g", "b"]}))
    logits, feats = judge(torch.rand(5, 3, 32, 32))
    assert logits["kind"].shape == (5, 2) and logits["colour"].shape == (5, 3)
    assert feats.shape == (5, 256)
    # other image sizes are resized to the judge's
    assert judge.predict(np.zeros((2, 64, 64, 3), np.uint8))["colour"].shape == (2,)
