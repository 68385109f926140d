"""Controlled generation by demonstrations on the demo world (the paper's §4.3 use).

Each case is a prompt that leaves an attribute open, e.g. "a big triangle on the left"
(colour open) or "a shape on the left" (colour and shape open), and two demonstrations
that share a value of it: two rendered objects, both blue (or both blue triangles), with
their captions, whose other attributes are drawn at random. The judge reads the output's
attributes; a case is *adopted* when the output takes on the shared value(s).

Measured per decoder, on the same prompts and seeds:

- `demo_adopt_none`: no demonstrations, K=2 retrieved documents (RA-CM3): the rate by
  chance and habit;
- `demo_adopt`: the two demonstrations as the whole context. This is what the API does
  by default: demonstrations take the place of retrieved documents, because the decoder
  was trained with at most K=2 documents in context;
- `demo_adopt_k2` (RA-CM3): demonstrations plus K=2 retrieved documents (an explicit
  `retrieval.k: 2`), four documents: more than the decoder ever saw;
- `demo_adopt_<attributes>`: `demo_adopt` per kind of case;
- `demo_prompt_acc*`: the share of the attributes the prompt does state (size,
  position, ...) that the output gets right, in the same conditions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.jobs import FewShotExample, NeighbourDoc, T2IJob
from world.captions import n_templates
from world.schema import COLOURS, POSITIONS, SHAPES, SIZES, Attributes

# What the prompt leaves open, in rotation over the cases.
OPEN_SETS: tuple[tuple[str, ...], ...] = (("colour",), ("shape",), ("colour", "shape"))

_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top",
          "bottom": "at the bottom", "center": "in the center"}

TASK_DESCRIPTION = ("object prompts leaving colour, shape or both open, two demonstrations "
                    "sharing them; judged")


@dataclass
class DemoCase:
    prompt: str
    examples: list[FewShotExample]
    shared: Attributes  # the open attributes' value in both demonstrations
    stated: Attributes  # the attributes the prompt states


def open_prompt(target: Attributes, open_attrs: Sequence[str]) -> str:
    """An object caption with the open attributes left out ("shape" stands in for the
    shape word, as a person would write it)."""
    words = [target["size"]]
    if "colour" not in open_attrs:
        words.append(target["colour"])
    words.append("shape" if "shape" in open_attrs else target["shape"])
    if open_attrs == ("colour", "shape"):
        words = ["shape"]  # "a shape on the left": the size goes too
    return f"a {' '.join(words)} {_WHERE[target['position']]}"


def demo_cases(world: Any, n: int, seed: int) -> list[DemoCase]:
    """`n` cases, deterministic in `seed`, cycling through `OPEN_SETS`."""
    rng = np.random.default_rng([seed, 17])
    values = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}

    def draw() -> Attributes:
        return {"kind": "object", **{k: str(rng.choice(v)) for k, v in values.items()}}

    cases = []
    for i in range(n):
        open_attrs = OPEN_SETS[i % len(OPEN_SETS)]
        target = draw()
        shared = {a: target[a] for a in open_attrs}
        stated = {a: target[a] for a in ("size", "colour", "shape", "position")
                  if a not in open_attrs and (a != "size" or len(open_attrs) == 1)}
        examples = []
        for _ in range(2):
            attrs = {**draw(), **shared}
            variant = int(rng.integers(_n_variants(world, attrs)))
            template = int(rng.integers(n_templates("object")))
            examples.append(FewShotExample(world.render(attrs, variant),
                                           world.caption(attrs, template)))
        cases.append(DemoCase(open_prompt(target, open_attrs), examples, shared, stated))
    return cases


def _n_variants(world: Any, attrs: Attributes) -> int:
    public = getattr(world, "n_variants", None)
    return int(public(attrs)) if public is not None else world._renderer.n_variants(attrs)


def adoption(predicted: Sequence[Attributes], cases: Sequence[DemoCase]) -> float:
    hits = [all(p.get(a) == v for a, v in c.shared.items())
            for p, c in zip(predicted, cases, strict=True)]
    return float(np.mean(hits))


def prompt_accuracy(predicted: Sequence[Attributes], cases: Sequence[DemoCase]) -> float:
    right = [p.get(a) == v for p, c in zip(predicted, cases, strict=True)
             for a, v in c.stated.items()]
    return float(np.mean(right))


def eval_examples(ev: Any, seed: int) -> dict[str, dict[str, float]]:
    """The task for `evaluation.evaluate.Evaluator` (`ev`): per decoder, the rates above."""
    cases = demo_cases(ev.world, ev.config.n, ev.config.seed)
    retrieved = ev.retrieve_for_texts([c.prompt for c in cases])
    nobody: list[list[NeighbourDoc]] = [[] for _ in cases]
    out: dict[str, dict[str, float]] = {}
    for system in ("ra_cm3", "cm3"):
        def judged(with_examples: bool, docs: Sequence[list[NeighbourDoc]],
                   system: str = system) -> list[Attributes]:
            images = generate(ev, system, cases, docs, with_examples, seed)
            return ev.judge.predict_attributes(images, ev.world)

        # CM3 has no retrieval: its neighbours are always none
        none = judged(False, retrieved if system == "ra_cm3" else nobody)
        demos = judged(True, nobody)
        metrics = {
            "demo_adopt_none": adoption(none, cases),
            "demo_adopt": adoption(demos, cases),
            "demo_prompt_acc_none": prompt_accuracy(none, cases),
            "demo_prompt_acc": prompt_accuracy(demos, cases),
        }
        for open_attrs in OPEN_SETS:
            rows = [i for i, c in enumerate(cases) if tuple(c.shared) == open_attrs]
            metrics[f"demo_adopt_{'_'.join(open_attrs)}"] = adoption(
                [demos[i] for i in rows], [cases[i] for i in rows])
        if system == "ra_cm3":
            both = judged(True, retrieved)
            metrics["demo_adopt_k2"] = adoption(both, cases)
            metrics["demo_prompt_acc_k2"] = prompt_accuracy(both, cases)
        out[system] = metrics
    ev.counts["examples"] = len(cases)
    return out


def generate(ev: Any, system: str, cases: Sequence[DemoCase],
             neighbours: Sequence[list[NeighbourDoc]], with_examples: bool,
             seed: int) -> np.ndarray:
    d = ev.config.t2i
    jobs = [T2IJob(c.prompt, list(nbs), n=1, num_candidates=d.num_candidates,
                   sampling=d.sampling(seed + i),
                   examples=list(c.examples) if with_examples else [])
            for i, (c, nbs) in enumerate(zip(cases, neighbours, strict=True))]
    results = ev._batched(ev.engines[system].text_to_image, jobs)
    return np.stack([r[0].image for r in results])
