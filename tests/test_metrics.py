"""FID-style distance, corpus BLEU-4 and attribute accuracy, against hand-worked values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.metrics import (
    attribute_accuracy,
    attribute_match,
    bleu4,
    bleu_tokens,
    caption_attribute_accuracy,
    frechet_distance,
)
from world import IGNORE

# --- Fréchet distance --------------------------------------------------------------------


@pytest.mark.parametrize("use_scipy", [True, False])
def test_fid_of_identical_sets_is_zero(use_scipy: bool) -> None:
    feats = np.random.default_rng(0).normal(size=(400, 32))
    assert frechet_distance(feats, feats, use_scipy=use_scipy) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("use_scipy", [True, False])
def test_fid_grows_with_a_shift(use_scipy: bool) -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2000, 8))
    b = rng.normal(size=(2000, 8))
    near = frechet_distance(a, b, use_scipy=use_scipy)
    shifted = frechet_distance(a, b + 1.0, use_scipy=use_scipy)
    # a shift of 1 in each of 8 dimensions adds ||delta||^2 = 8 to the sampling noise
    assert near < 0.1
    assert shifted == pytest.approx(near + 8.0, abs=0.3)


def test_fid_matches_the_closed_form_in_one_dimension() -> None:
    # 1-D: (mu_a - mu_b)^2 + s_a^2 + s_b^2 - 2 s_a s_b = (mu_a - mu_b)^2 + (s_a - s_b)^2
    a = np.array([[1.0], [2.0], [3.0], [4.0]])  # mean 2.5, unbiased var 5/3
    b = np.array([[0.0], [4.0], [8.0], [12.0]])  # mean 6, unbiased var 80/3
    expected = (2.5 - 6.0) ** 2 + (math.sqrt(5 / 3) - math.sqrt(80 / 3)) ** 2
    for use_scipy in (True, False):
        assert frechet_distance(a, b, use_scipy=use_scipy) == pytest.approx(expected, rel=1e-9)


def test_fid_scipy_and_eigh_agree_with_more_features_than_samples() -> None:
    # Singular covariances, as with a few hundred generated images and 256 judge features.
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(64, 128)), rng.normal(size=(64, 128)) * 1.5 + 0.2
    assert frechet_distance(a, b, use_scipy=True) == pytest.approx(
        frechet_distance(a, b, use_scipy=False), rel=1e-4)


def test_fid_rejects_mismatched_features() -> None:
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((10, 4)), np.zeros((10, 5)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((1, 4)), np.zeros((10, 4)))


# --- BLEU-4 ------------------------------------------------------------------------------


def test_bleu_of_identical_corpus_is_one() -> None:
    captions = ["a big blue square on the left", "the flag of Veloria",
                "a red ring above a cyan cross"]
    assert bleu4(captions, [[c] for c in captions]) == pytest.approx(1.0)


def test_bleu_of_disjoint_corpus_is_near_zero() -> None:
    hyps = ["one two three four five six"] * 20
    refs = [["a big blue square on the left"]] * 20
    assert bleu4(hyps, refs) < 0.01


def test_bleu_matches_a_hand_worked_example() -> None:
    # hyp: the cat sat on the mat / ref: the cat is on the mat (both 6 tokens: BP = 1)
    # 1-grams 5/6 (sat is wrong), 2-grams 3/5 (the cat, on the, the mat), 3-grams 1/4
    # (on the mat), 4-grams 0/3 -> smoothed to 1/(2*3).
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert bleu4(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(expected)


def test_bleu_brevity_penalty_and_clipping() -> None:
    # "the the the the" against "the cat is on the mat": unigram matches clip at 2
    # and a 4-token hypothesis against 6 reference tokens gets exp(1 - 6/4).
    score = bleu4(["the the the the"], [["the cat is on the mat"]])
    expected = math.exp(1 - 6 / 4) * (2 / 4 * 1 / (2 * 3) * 1 / (4 * 2) * 1 / (8 * 1)) ** 0.25
    assert score == pytest.approx(expected)
    # with several references the closest length counts and the best match clips
    assert bleu4(["a red circle left of a blue ring"],
                 [["a blue ring", "a red circle left of a blue ring"]]) == pytest.approx(1.0)


def test_bleu_tokens_split_punctuation_and_case() -> None:
    assert bleu_tokens("Veloria's flag, big") == ["veloria", "'", "s", "flag", ",", "big"]


# --- attribute accuracy ------------------------------------------------------------------


def test_attribute_accuracy_skips_heads_that_do_not_apply() -> None:
    target = {"shape": np.array([0, 1, 2, 3]), "size": np.array([1, IGNORE, 0, IGNORE])}
    pred = {"shape": np.array([0, 1, 2, 0]), "size": np.array([1, 1, 1, 0])}
    acc = attribute_accuracy(pred, target)
    assert acc["shape"] == pytest.approx(0.75)
    assert acc["size"] == pytest.approx(0.5)  # only samples 0 and 2 have a size
    assert acc["mean"] == pytest.approx(0.625)
    assert acc["all"] == pytest.approx(0.5)  # samples 0 and 1 are right on every head


def test_attribute_match_and_parsed_captions() -> None:
    targets = [
        {"kind": "object", "shape": "square", "colour": "blue", "size": "big", "position": "left"},
        {"kind": "entity", "entity": "Veloria"},
        {"kind": "pair", "shape": "circle", "colour": "red", "relation": "left of",
         "shape2": "ring", "colour2": "blue"},
    ]
    captions = [
        "a big blue square on the right",  # position wrong: 4 of 5 keys
        "the flag of Veloria",  # all right
        "a blue ring right of a red circle",  # the same pair, phrased the other way round
    ]
    acc = caption_attribute_accuracy(captions, targets)
    assert acc["exact"] == pytest.approx(2 / 3)
    assert acc["attribute"] == pytest.approx((4 + 2 + 6) / 13)
    assert acc["position"] == 0.0 and acc["entity"] == 1.0 and acc["relation"] == 1.0
    # a caption that does not parse is wrong on every key
    unparsed = caption_attribute_accuracy(["hello world"], targets[:1])
    assert unparsed["exact"] == 0.0 and unparsed["attribute"] == 0.0
    assert attribute_match([targets[0]], targets[:1])["exact"] == 1.0
