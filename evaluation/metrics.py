"""Evaluation metrics: FID-style distance, corpus BLEU-4 and attribute accuracy.

- `frechet_distance` is the FID formula (Heusel et al. 2017) applied to any feature set;
  racm3 feeds it the judge's penultimate features instead of Inception's.
- `bleu4` is corpus BLEU (Papineni et al. 2002): clipped n-gram precisions pooled over
  the corpus, geometric mean of n = 1..4, brevity penalty against the closest reference
  length. A zero n-gram count is smoothed with sacreBLEU's default "exp" method, so one
  missing 4-gram does not zero a whole score.
- Attribute accuracy compares attribute dicts (`world` schema) or per-head integer
  labels (the judge's form, with IGNORE = -1 where a head does not apply).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from world import IGNORE, Attributes, parse_caption

try:  # scipy's sqrtm is the reference FID implementation's; numpy eigh is the fallback
    from scipy import linalg as _scipy_linalg
except ImportError:  # pragma: no cover - scipy is a dependency; the fallback is tested directly
    _scipy_linalg = None

# --- Fréchet distance --------------------------------------------------------------------


def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and unbiased covariance (F, F) of (N, F) features, in float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, F), got {feats.shape}")
    return feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False))


def frechet_distance(
    feats_a: np.ndarray, feats_b: np.ndarray, *, use_scipy: bool | None = None
) -> float:
    """FID between two (N, F) feature sets:
    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    `use_scipy=None` uses scipy.linalg.sqrtm when scipy is installed, else the symmetric
    eigen-decomposition; both give the same value to rounding.
    """
    mu_a, cov_a = feature_statistics(feats_a)
    mu_b, cov_b = feature_statistics(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sizes differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    if use_scipy is None:
        use_scipy = _scipy_linalg is not None
    if use_scipy and _scipy_linalg is None:
        raise ImportError("scipy is not installed")
    trace_sqrt = _trace_sqrt_scipy(cov_a, cov_b) if use_scipy else _trace_sqrt_eigh(cov_a, cov_b)
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
    return float(max(value, 0.0))  # rounding can leave identical sets a hair below zero


def _trace_sqrt_scipy(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """Tr((S_a S_b)^(1/2)) as pytorch-fid computes it."""
    covmean = _scipy_linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        # A singular product (fewer samples than features): nudge both diagonals, as the
        # reference implementation does.
        offset = np.eye(cov_a.shape[0]) * 1e-6
        covmean = _scipy_linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    # Rounding gives tiny imaginary parts to a matrix whose true root is real.
    return float(np.real(np.trace(covmean)))


def _trace_sqrt_eigh(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """Tr((S_a S_b)^(1/2)) = Tr((A^(1/2) S_b A^(1/2))^(1/2)) with A^(1/2) the symmetric
    root of S_a: the inner matrix is symmetric PSD, so eigh is exact and stable even for
    singular covariances."""
    vals, vecs = np.linalg.eigh(cov_a)
    root_a = (vecs * np.sqrt(vals.clip(min=0.0))) @ vecs.T
    inner = root_a @ cov_b @ root_a
    inner_vals = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    return float(np.sqrt(inner_vals.clip(min=0.0)).sum())


# --- BLEU-4 ------------------------------------------------------------------------------

_TOKEN = re.compile(r"\w+|[^\w\s]")


def bleu_tokens(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: "Veloria's flag" -> veloria ' s flag."""
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu4(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    tokenize: Callable[[str], list[str]] = bleu_tokens,
) -> float:
    """Corpus BLEU-4 in [0, 1]; `references[i]` holds one or more references for
    `hypotheses[i]`."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    max_n = 4
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references, strict=True):
        if isinstance(refs, str):
            raise TypeError("each entry of references must be a list of strings")
        if not refs:
            raise ValueError("every hypothesis needs at least one reference")
        h = tokenize(hyp)
        rs = [tokenize(r) for r in refs]
        hyp_len += len(h)
        # closest reference length; on a tie the shorter one (as sacreBLEU and NLTK do)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            hyp_counts = _ngrams(h, n)
            max_ref: Counter = Counter()
            for r in rs:
                max_ref |= _ngrams(r, n)  # per n-gram, its largest count in any reference
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in hyp_counts.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0:
        return 0.0
    log_precision = 0.0
    smooth = 1.0
    for n in range(max_n):
        if totals[n] == 0:
            return 0.0  # no hypothesis has n-grams of this order at all
        if matches[n] == 0:
            smooth *= 2.0  # "exp" smoothing: 1/2, 1/4, ... for successive empty orders
            log_precision += math.log(1.0 / (smooth * totals[n]))
        else:
            log_precision += math.log(matches[n] / totals[n])
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return brevity * math.exp(log_precision / max_n)


# --- attribute accuracy ------------------------------------------------------------------


def attribute_accuracy(
    pred: Mapping[str, np.ndarray | Sequence[int]],
    target: Mapping[str, np.ndarray | Sequence[int]],
) -> dict[str, float]:
    """Per-head accuracy of integer labels, skipping targets equal to IGNORE.

    Returns one entry per head of `target` that applies to at least one sample, plus
    "mean" (the mean over those heads) and "all" (the fraction of samples whose every
    applicable head is right).
    """
    out: dict[str, float] = {}
    all_right: np.ndarray | None = None
    for head, tgt in target.items():
        if head not in pred:
            raise KeyError(f"no prediction for head {head!r}")
        t, p = np.asarray(tgt), np.asarray(pred[head])
        if t.shape != p.shape:
            raise ValueError(f"head {head!r}: {p.shape} predictions for {t.shape} targets")
        applies = t != IGNORE
        right = (p == t) | ~applies
        all_right = right if all_right is None else all_right & right
        if applies.any():
            out[head] = float((p[applies] == t[applies]).mean())
    if all_right is None or not all_right.size:
        raise ValueError("attribute_accuracy needs at least one head and one sample")
    out["mean"] = float(np.mean([out[h] for h in target if h in out])) if out else 0.0
    out["all"] = float(all_right.mean())
    return out


def attribute_match(
    predicted: Sequence[Mapping[str, str]], targets: Sequence[Attributes]
) -> dict[str, float]:
    """Compare attribute dicts (as `World.attributes_from_labels` or `parse_caption` give).

    Each target key counts once per sample; a missing or different predicted value is
    wrong (a prediction of the wrong kind usually lacks the target's keys). Returns
    "exact" (every key of the target right), "attribute" (the fraction of all target keys
    right) and one accuracy per key.
    """
    if len(predicted) != len(targets):
        raise ValueError(f"{len(predicted)} predictions for {len(targets)} targets")
    if not targets:
        raise ValueError("attribute_match needs at least one sample")
    per_key: dict[str, list[bool]] = {}
    exact = []
    for pred, target in zip(predicted, targets, strict=True):
        rights = [pred.get(key) == value for key, value in target.items()]
        for (key, _), right in zip(target.items(), rights, strict=True):
            per_key.setdefault(key, []).append(right)
        exact.append(all(rights))
    n_right = sum(sum(v) for v in per_key.values())
    n_keys = sum(len(v) for v in per_key.values())
    return {
        "exact": float(np.mean(exact)),
        "attribute": n_right / n_keys,
        **{key: float(np.mean(v)) for key, v in per_key.items()},
    }


def caption_attribute_accuracy(
    captions: Sequence[str], targets: Sequence[Attributes]
) -> dict[str, float]:
    """`attribute_match` of parsed captions; a caption that does not parse (parse_caption
    gives {} or a partial dict) is wrong on every key it does not state."""
    return attribute_match([parse_caption(c) for c in captions], targets)
