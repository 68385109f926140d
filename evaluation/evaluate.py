"""`racm3 eval`: RA-CM3 against CM3 and against retrieval alone, on the held-out eval split.

Four systems answer the same prompts with the same seeds:

- `ra_cm3`: the retrieval-augmented decoder as served by default: K neighbours in
  context, retrieved from the memory exactly as the service retrieves them (CLIP text
  embedding of the prompt, or CLIP image embedding for captioning, fused in hybrid mode
  with BM25 over the captions or with the image's VQ codes; the paper's rules:
  relevance, modality, diversity), and retrieval-guided decoding at the served weight
  (model/retrieval_guidance.py);
- `ra_cm3_paper`: the paper's method with the same decoder: neighbours retrieved by
  CLIP alone (dense) and decoded as the paper does (retrieval guidance 0): every gain of
  `ra_cm3` over it comes from hybrid retrieval and guided decoding;
- `cm3`: the same decoder architecture trained without retrieval, with no neighbours;
- `retrieval_only`: no decoder at all: the top neighbour's image (VQ-decoded from its
  codes, so it passes through the same image tokenizer as the generated images) or
  caption; for infilling, the masked region pasted from that image.

Tasks and metrics (the shape of the paper's tables on the demo world; docs/architecture.md):

- `t2i_attr_acc` / `t2i_fid`: caption→image on the eval object and pair prompts
  (held-out combinations included). The judge reads the generated image's attributes;
  the score is the fraction of attributes right (`t2i_exact`: every attribute right).
  FID compares judge features of the generated images with real renders of the same
  prompts' attributes.
- `i2t_attr_acc` / `i2t_bleu4`: image→caption on eval-split items; the caption is parsed
  back to attributes; BLEU-4 references are the item's captions under every template.
- `entity_acc`: "the flag of X" for the memory-only entities; right when the judge's
  entity head names X. Without retrieval the model cannot know these.
- `i2t_entity_named`: of the i2t items that are flags, the share whose caption has the
  entity's name; `i2t_entity_retrieved`: the share whose neighbours hold it;
  `i2t_entity_named_retrieved`: named, among those. `i2t_*_scenes`: attribute accuracy
  and BLEU-4 of the object and pair items alone.
- `*_prompt_rerank` (t2i accuracy, entity): the same samples, but the candidate kept is
  the one CLIP scores best against the prompt alone, without the retrieved images' vote
  in the ranking: how much of RA-CM3's score the reranking adds.
- `infill_acc`: eval object items with the object's box masked (snapped to the VQ grid),
  infilled with the caption as prompt; the judge's attributes of the result.

    result, rows = evaluate(Bundle("bundles/demo"), Memory.load("memory"))
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evaluation.examples import TASK_DESCRIPTION as EXAMPLES_TASK
from evaluation.examples import eval_examples
from evaluation.judge import load_judge
from evaluation.metrics import attribute_match, bleu4, caption_attribute_accuracy, frechet_distance
from evaluation.report import GridRow, save_example_grid, write_markdown
from model.bundle import bundle_diversity_threshold, write_manifest
from model.engine import Engine
from model.jobs import (
    CaptionJob,
    InfillJob,
    NeighbourDoc,
    SamplingParams,
    T2IJob,
)
from world import ENTITY_HEAD, Attributes, World, WorldConfig, WorldItem, n_templates
from world.captions import caption as render_caption

log = logging.getLogger(__name__)

SYSTEMS = ("ra_cm3", "ra_cm3_paper", "cm3", "retrieval_only")
METRICS = ("t2i_attr_acc", "t2i_fid", "i2t_attr_acc", "i2t_bleu4", "entity_acc", "infill_acc")
DECODERS = ("ra_cm3", "cm3")
# system -> (decoder, retrieval guidance: None is the engine's served default)
GENERATIVE: dict[str, tuple[str, float | None]] = {
    "ra_cm3": ("ra_cm3", None),
    "ra_cm3_paper": ("ra_cm3", 0.0),
    "cm3": ("cm3", 0.0),
}


@dataclass(frozen=True)
class Decoding:
    """One task's decoding settings, shared by RA-CM3 and CM3 so only retrieval differs."""

    temperature: float
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float = 1.0
    num_candidates: int = 1  # >1: sample this many and keep the engine's best (CLIP rerank)

    def sampling(self, seed: int) -> SamplingParams:
        return SamplingParams(seed=seed, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, guidance_scale=self.guidance_scale)


# Image tokens are sampled (temperature 1 as in the paper) but from the top 16 codes only:
# a 64-code image is ruined by one rare code, and top-k removes that tail without turning
# generation into the mode-seeking of greedy decoding. Captions are greedy: a caption is
# judged on its facts, and the likeliest caption is the model's best statement of them.
# Chosen on 10 seen-combination prompts (not the eval prompts) for the demo bundle: lower
# temperature, classifier-free guidance 2 and 8 CLIP-reranked candidates gave 5/10 exact
# for RA-CM3 against 2/10 at temperature 1 with 4 candidates and no guidance.
T2I_DECODING = Decoding(temperature=0.5, top_k=16, guidance_scale=2.0, num_candidates=8)
CAPTION_DECODING = Decoding(temperature=0.0)
INFILL_DECODING = Decoding(temperature=1.0, top_k=16)


@dataclass(frozen=True)
class EvalConfig:
    n: int = 200  # prompts per task
    seed: int = 0
    k: int = 2  # neighbours in context (K=2 in the paper)
    diversity_threshold: float | None = None  # None: the bundle recipe's value
    batch_size: int = 16  # jobs per engine call
    grid_rows: int = 8  # examples in the PNG grid: half t2i prompts, half entities
    t2i: Decoding = T2I_DECODING
    caption: Decoding = CAPTION_DECODING
    infill: Decoding = INFILL_DECODING
    tasks: tuple[str, ...] = ("t2i", "i2t", "entity", "infill")  # a subset for quick looks
    # retrieval of every system but the paper's row; None: the service's default mode
    retrieval_mode: str | None = None

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ValueError("n must be at least 2 (FID needs two samples per side)")
        unknown = set(self.tasks) - set(TASKS)
        if unknown or not self.tasks:
            raise ValueError(f"unknown tasks {sorted(unknown)}; choose from "
                             f"{', '.join(TASKS)}")


TASKS = {
    "t2i": "eval object + pair prompts (held-out combos first), judged",
    "i2t": "eval-split items, captions parsed; BLEU-4 against every template",
    "entity": "'flag of X' prompts for memory-only entities, judge's entity head",
    "infill": "eval object items, object box masked, caption as prompt, judged",
    "examples": EXAMPLES_TASK,  # opt-in: --tasks examples (evaluation/examples.py)
}


@dataclass
class EvalOutput:
    result: dict[str, Any]  # the JSON document
    grid_rows: list[GridRow] = field(default_factory=list)


class Evaluator:
    """Runs every task for every system; one instance per (bundle, memory)."""

    def __init__(self, bundle: Any, memory: Any, config: EvalConfig | None = None) -> None:
        from retrieval.search import SearchStrategy

        self.bundle = bundle
        self.memory = memory
        self.config = config or EvalConfig()
        self.world = World(WorldConfig.from_dict(bundle.manifest["world"]))
        self.engines = {name: Engine.from_bundle(bundle, name) for name in DECODERS}
        self.judge = load_judge(bundle)
        self.clip = bundle.clip
        self.diversity_threshold = bundle_diversity_threshold(
            bundle.manifest, self.config.diversity_threshold)
        self.strategy = SearchStrategy(k=self.config.k,
                                       diversity_threshold=self.diversity_threshold)
        self.served_mode = self.config.retrieval_mode or served_retrieval_mode()
        self.grid_rows: list[GridRow] = []
        self.counts: dict[str, int] = {}  # prompts actually evaluated per task

    @property
    def engine(self) -> Engine:
        return self.engines["ra_cm3"]

    # --- retrieval ---------------------------------------------------------------------

    def retrieval_mode(self, system: str) -> str:
        """The paper's row retrieves by CLIP alone; the others as the service does."""
        return "dense" if system == "ra_cm3_paper" else self.served_mode

    def retrieve_for_texts(self, texts: Sequence[str], mode: str | None = None,
                           ) -> list[list[NeighbourDoc]]:
        return self._search(self.clip.encode_text(list(texts)), list(texts),
                            mode or self.served_mode)

    def retrieve_by_mode(self, texts: Sequence[str]) -> dict[str, list[list[NeighbourDoc]]]:
        """Each system's neighbours for text queries, searched once per retrieval mode."""
        found = {m: self.retrieve_for_texts(texts, m)
                 for m in {self.retrieval_mode(s) for s in SYSTEMS}}
        return {s: found[self.retrieval_mode(s)] for s in SYSTEMS}

    def retrieve_for_images(self, images: np.ndarray, mode: str | None = None,
                            ) -> list[list[NeighbourDoc]]:
        """As the service retrieves for an image query: CLIP's image embedding, and in
        hybrid mode the image's VQ codes matched against the stored ones."""
        mode = mode or self.served_mode
        codes = list(self.engine.encode_images(list(images))) if mode == "hybrid" else None
        return self._search(self.clip.encode_image(images), None, mode, codes)

    def retrieve_images_by_mode(self, images: np.ndarray) -> dict[str, list[list[NeighbourDoc]]]:
        """Each system's neighbours for image queries, searched once per retrieval mode."""
        found = {m: self.retrieve_for_images(images, m)
                 for m in {self.retrieval_mode(s) for s in SYSTEMS}}
        return {s: found[self.retrieval_mode(s)] for s in SYSTEMS}

    def _search(self, vectors: np.ndarray, texts: list[str] | None,
                mode: str, codes: list[np.ndarray] | None = None) -> list[list[NeighbourDoc]]:
        from retrieval.search import neighbours, search

        found = search(self.memory, vectors, self.config.k, replace(self.strategy, mode=mode),
                       texts=texts, codes=codes)
        texts_or_none = texts or [None] * len(found)
        return [neighbours(self.memory, hits[: self.config.k], text)
                for hits, text in zip(found, texts_or_none, strict=True)]

    def neighbour_image(self, doc: NeighbourDoc) -> np.ndarray | None:
        if doc.image_codes is None:
            return None
        return self.engine.decode_codes(np.asarray(doc.image_codes)[None])[0]

    def neighbour_caption(self, doc: NeighbourDoc) -> str:
        if doc.caption:
            return doc.caption
        if doc.text_ids:
            return self.bundle.tokenizer.decode(list(doc.text_ids))
        return ""

    def _blank(self) -> np.ndarray:
        size = self.bundle.image_size
        return np.full((size, size, 3), 128, dtype=np.uint8)

    # --- systems -------------------------------------------------------------------------

    def text_to_image(self, system: str, prompts: Sequence[str],
                      neighbours: Sequence[list[NeighbourDoc]], seed: int) -> np.ndarray:
        """(N, H, W, 3) uint8: one image per prompt; prompt i is sampled with seed + i."""
        return self.text_to_image_ranked(system, prompts, neighbours, seed)[0]

    def text_to_image_ranked(self, system: str, prompts: Sequence[str],
                             neighbours: Sequence[list[NeighbourDoc]], seed: int,
                             ) -> tuple[np.ndarray, np.ndarray]:
        """The engine's choice among each prompt's candidates, and the candidate with the
        best CLIP score against the prompt alone (the ranking without the retrieved
        images' vote; see `Engine.rerank_scores`), from the same samples."""
        if system == "retrieval_only":
            images = np.stack([self.top_image(nbs) for nbs in neighbours])
            return images, images
        d = self.config.t2i
        decoder, weight = GENERATIVE[system]
        jobs = [T2IJob(p, self._context(system, nbs), n=d.num_candidates,
                       num_candidates=d.num_candidates, sampling=d.sampling(seed + i),
                       retrieval_guidance=weight)
                for i, (p, nbs) in enumerate(zip(prompts, neighbours, strict=True))]
        results = self._batched(self.engines[decoder].text_to_image, jobs)
        return (np.stack([r[0].image for r in results]),
                np.stack([max(r, key=lambda c: c.score).image for r in results]))

    def caption(self, system: str, images: np.ndarray,
                neighbours: Sequence[list[NeighbourDoc]], seed: int) -> list[str]:
        if system == "retrieval_only":
            return [self.neighbour_caption(nbs[0]) if nbs else "" for nbs in neighbours]
        d = self.config.caption
        decoder, weight = GENERATIVE[system]
        jobs = [CaptionJob(img, self._context(system, nbs), n=1,
                           num_candidates=d.num_candidates, sampling=d.sampling(seed + i),
                           retrieval_guidance=weight)
                for i, (img, nbs) in enumerate(zip(images, neighbours, strict=True))]
        results = self._batched(self.engines[decoder].caption, jobs)
        return [r[0].text for r in results]

    def infill(self, system: str, images: np.ndarray, masks: np.ndarray, prompts: Sequence[str],
               neighbours: Sequence[list[NeighbourDoc]], seed: int) -> np.ndarray:
        if system == "retrieval_only":
            out = images.copy()
            for i, nbs in enumerate(neighbours):
                out[i][masks[i]] = self.top_image(nbs)[masks[i]]
            return out
        d = self.config.infill
        jobs = [InfillJob(img, m, p, self._context(system, nbs), n=1,
                          num_candidates=d.num_candidates, sampling=d.sampling(seed + i))
                for i, (img, m, p, nbs) in enumerate(zip(images, masks, prompts, neighbours,
                                                         strict=True))]
        results = self._batched(self.engines[GENERATIVE[system][0]].infill, jobs)
        return np.stack([r[0].image for r in results])

    @staticmethod
    def _context(system: str, neighbours: list[NeighbourDoc]) -> list[NeighbourDoc]:
        return neighbours if GENERATIVE[system][0] == "ra_cm3" else []

    def top_image(self, neighbours: list[NeighbourDoc]) -> np.ndarray:
        for doc in neighbours:
            image = self.neighbour_image(doc)
            if image is not None:
                return image
        return self._blank()  # nothing retrieved: retrieval alone has no answer

    def _batched(self, fn: Callable[[list], list], jobs: list) -> list:
        out: list = []
        for start in range(0, len(jobs), self.config.batch_size):
            out += fn(jobs[start : start + self.config.batch_size])
        return out

    # --- prompts and items ---------------------------------------------------------------

    def t2i_prompts(self) -> list[tuple[str, Attributes]]:
        """Object and pair eval prompts, interleaved, held-out combos first; beyond the
        pool, the same scenes again under the next caption template."""
        objects = self.world.eval_prompts("object")
        pairs = self.world.eval_prompts("pair")
        pool = [p.attributes for p in _interleave(objects, pairs)]
        return _cycle_templates(pool, self.config.n)

    def entity_prompts(self) -> list[tuple[str, Attributes]]:
        pool = [{"kind": "entity", "entity": name} for name in self.world.memory_only_entities]
        return _cycle_templates(pool, self.config.n)

    def eval_items(self, kind: str | None = None) -> list[WorldItem]:
        """Up to n eval-split items (of one kind), in a seeded order."""
        rng = np.random.default_rng([self.config.seed, 11])
        items = []
        for index in rng.permutation(self.world.split_size("eval")):
            item = self.world.sample("eval", int(index))
            if kind is None or item.attributes["kind"] == kind:
                items.append(item)
                if len(items) == self.config.n:
                    break
        return items

    def real_renders(self, attributes: Sequence[Attributes]) -> np.ndarray:
        """A real image per scene, at a seeded jitter variant (real data is jittered)."""
        rng = np.random.default_rng([self.config.seed, 13])
        return np.stack([self.world.render(a, int(rng.integers(_n_variants(self.world, a))))
                         for a in attributes])

    # --- tasks ---------------------------------------------------------------------------

    def _seed(self, task: str) -> int:
        """First sampling seed of a task; prompt i uses this + i, for every system."""
        return self.config.seed * 1_000_003 + list(TASKS).index(task) * 100_000

    def eval_t2i(self) -> dict[str, dict[str, float]]:
        prompts = self.t2i_prompts()
        self.counts["t2i"] = len(prompts)
        captions = [c for c, _ in prompts]
        targets = [a for _, a in prompts]
        heldout = np.array([self.world.group_of(a) == "heldout" for a in targets])
        neighbours = self.retrieve_by_mode(captions)
        real_feats = self.judge.features(self.real_renders(targets))
        seed = self._seed("t2i")
        out: dict[str, dict[str, float]] = {}
        images_by_system = {}
        for system in SYSTEMS:
            images, by_prompt = self.text_to_image_ranked(system, captions, neighbours[system],
                                                          seed)
            images_by_system[system] = images
            predicted = self.judge.predict_attributes(images, self.world)
            match = attribute_match(predicted, targets)
            prompt_match = attribute_match(self.judge.predict_attributes(by_prompt, self.world),
                                           targets)
            # FID by the symmetric eigen-decomposition, not scipy's sqrtm: with fewer
            # prompts than feature dimensions (256) both covariances are singular, where
            # eigh stays exact and sqrtm warns, is slow and may need a nudge.
            out[system] = {
                "t2i_attr_acc": match["attribute"],
                "t2i_attr_acc_prompt_rerank": prompt_match["attribute"],
                "t2i_exact": match["exact"],
                "t2i_fid": frechet_distance(self.judge.features(images), real_feats,
                                            use_scipy=False),
            }
            if heldout.any():
                held = attribute_match([p for p, h in zip(predicted, heldout, strict=True) if h],
                                       [t for t, h in zip(targets, heldout, strict=True) if h])
                out[system]["t2i_attr_acc_heldout"] = held["attribute"]
        self._add_rows(captions, neighbours["ra_cm3"], images_by_system,
                       self.config.grid_rows // 2)
        return out

    def eval_i2t(self) -> dict[str, dict[str, float]]:
        items = self.eval_items()
        self.counts["i2t"] = len(items)
        images = np.stack([it.image for it in items])
        targets = [it.attributes for it in items]
        references = [[render_caption(a, t) for t in range(n_templates(a["kind"]))]
                      for a in targets]
        neighbours = self.retrieve_images_by_mode(images)
        seed = self._seed("i2t")
        names = [a.get("entity") for a in targets]
        flags = np.array([bool(n) for n in names])
        out = {}
        for system in SYSTEMS:
            found = np.array([bool(n) and any(n.lower() in self.neighbour_caption(d).lower()
                                              for d in nbs)
                              for n, nbs in zip(names, neighbours[system], strict=True)])
            captions = self.caption(system, images, neighbours[system], seed)
            match = caption_attribute_accuracy(captions, targets)
            named = np.array([bool(n) and n.lower() in c.lower()
                              for n, c in zip(names, captions, strict=True)])
            out[system] = {"i2t_attr_acc": match["attribute"], "i2t_exact": match["exact"],
                           "i2t_bleu4": bleu4(captions, references)}
            if (~flags).any():  # object and pair scenes alone: no names to copy
                scenes = [i for i, f in enumerate(flags) if not f]
                out[system]["i2t_attr_acc_scenes"] = caption_attribute_accuracy(
                    [captions[i] for i in scenes], [targets[i] for i in scenes])["attribute"]
                out[system]["i2t_bleu4_scenes"] = bleu4([captions[i] for i in scenes],
                                                        [references[i] for i in scenes])
            if flags.any():
                out[system]["i2t_entity_named"] = float(named[flags].mean())
                if system != "cm3":  # CM3 has no neighbours
                    out[system]["i2t_entity_retrieved"] = float(found[flags].mean())
                    if found.any():
                        out[system]["i2t_entity_named_retrieved"] = float(named[found].mean())
        return out

    def eval_entity(self) -> dict[str, dict[str, float]]:
        prompts = self.entity_prompts()
        self.counts["entity"] = len(prompts)
        captions = [c for c, _ in prompts]
        heads = self.world.label_heads[ENTITY_HEAD]
        target = np.array([heads.index(a["entity"]) for _, a in prompts])
        neighbours = self.retrieve_by_mode(captions)
        seed = self._seed("entity")
        out = {}
        images_by_system = {}
        for system in SYSTEMS:
            images, by_prompt = self.text_to_image_ranked(system, captions, neighbours[system],
                                                          seed)
            images_by_system[system] = images
            predicted = self.judge.predict(images)[ENTITY_HEAD]
            by_prompt_predicted = self.judge.predict(by_prompt)[ENTITY_HEAD]
            names = [a["entity"].lower() for _, a in prompts]
            out[system] = {"entity_acc": float((predicted == target).mean()),
                           "entity_acc_prompt_rerank": float((by_prompt_predicted == target)
                                                             .mean())}
            if system != "cm3":  # CM3 has no neighbours
                out[system]["entity_retrieved"] = float(np.mean([
                    any(n in self.neighbour_caption(d).lower() for d in nbs)
                    for n, nbs in zip(names, neighbours[system], strict=True)]))
        rows = self.config.grid_rows - self.config.grid_rows // 2
        self._add_rows(captions, neighbours["ra_cm3"], images_by_system, rows)
        return out

    def eval_infill(self) -> dict[str, dict[str, float]]:
        items = self.eval_items("object")
        self.counts["infill"] = len(items)
        images = np.stack([it.image for it in items])
        patch = self.bundle.image_size // self.bundle.space.image_grid[0]
        masks = np.stack([object_box_mask(it.image, patch) for it in items])
        captions = [it.caption for it in items]
        targets = [it.attributes for it in items]
        neighbours = self.retrieve_by_mode(captions)
        seed = self._seed("infill")
        out = {}
        for system in SYSTEMS:
            filled = self.infill(system, images, masks, captions, neighbours[system], seed)
            match = attribute_match(self.judge.predict_attributes(filled, self.world), targets)
            out[system] = {"infill_acc": match["attribute"], "infill_exact": match["exact"]}
        return out

    def copy_probe(self, n: int = 16) -> dict[str, float]:
        """Does RA-CM3 copy from its neighbours? Teacher-forced loss (nats per code) of a
        memory-only flag's image codes with a same-flag neighbour in context (another
        variant, another caption template), with none, and with another flag's.

        A decoder that copies scores far lower with the same flag (two variants of a flag
        share most of their codes); one that ignores its neighbours scores the same.
        `copy_row_*` is the same loss over the first grid row only: once a flag's first
        row is drawn the rest follows from the flag's own layout, so the whole-image
        average hides most of what the neighbour contributes; the first row is where the
        layout and colours are chosen, and where copying shows.
        """
        from model.tokens import SRC_ID, Document, assemble

        decoder = self.engines["ra_cm3"].decoder
        space, tok, vq = self.bundle.space, self.bundle.tokenizer, self.bundle.vq
        names = self.world.memory_only_entities[:n]

        def doc(name: str, variant: int, template: int) -> list[int]:
            attrs = {"kind": "entity", "entity": name}
            codes = vq.encode_images([self.world.render(attrs, variant)])[0]
            return Document(self.world.caption(attrs, template), codes).to_ids(space, tok.encode)

        nll: dict[str, list[torch.Tensor]] = {"same": [], "none": [], "other": []}
        for i, name in enumerate(names):
            main = doc(name, 0, 0)
            contexts = {"same": [doc(name, 1, 1)], "none": [],
                        "other": [doc(names[(i + 1) % len(names)], 1, 1)]}
            for key, context in contexts.items():
                ids = assemble(context, main).ids
                first = len(ids) - len(main) + main.index(SRC_ID) + 1  # first image code
                seq = torch.tensor([ids], device=self.engine.device)
                with torch.inference_mode():
                    logits, _ = decoder(seq)
                logp = torch.log_softmax(logits[0, first - 1 : first - 1 + space.image_len]
                                         .float(), dim=-1)
                target = seq[0, first : first + space.image_len]
                nll[key].append(-logp.gather(1, target[:, None])[:, 0])
        row = space.image_grid[1]
        return {**{f"copy_loss_{k}": float(torch.stack(v).mean()) for k, v in nll.items()},
                **{f"copy_row_{k}": float(torch.stack(v)[:, :row].mean()) for k, v in nll.items()}}

    def _add_rows(self, prompts: Sequence[str], neighbours: Sequence[list[NeighbourDoc]],
                  images: dict[str, np.ndarray], n: int) -> None:
        for i in range(min(n, len(prompts))):
            self.grid_rows.append(GridRow(
                prompt=prompts[i],
                neighbours=[im for im in map(self.neighbour_image, neighbours[i])
                            if im is not None],
                neighbour_captions=[self.neighbour_caption(d) for d in neighbours[i]],
                ra_cm3=images["ra_cm3"][i],
                cm3=images["cm3"][i],
                ra_cm3_paper=images["ra_cm3_paper"][i],
            ))

    # --- all -----------------------------------------------------------------------------

    def run(self) -> EvalOutput:
        start = time.perf_counter()
        systems: dict[str, dict[str, float]] = {s: {} for s in SYSTEMS}
        task_wall: dict[str, float] = {}
        tasks = (("t2i", self.eval_t2i), ("i2t", self.eval_i2t),
                 ("entity", self.eval_entity), ("infill", self.eval_infill),
                 ("examples", lambda: eval_examples(self, self._seed("examples"))))
        for name, run_task in tasks:
            if name not in self.config.tasks:
                continue
            t0 = time.perf_counter()
            for system, values in run_task().items():
                systems[system].update(values)
            task_wall[name] = round(time.perf_counter() - t0, 2)
            log.info("eval %s: %s (%.1fs)", name,
                     {s: {k: round(v, 3) for k, v in m.items()} for s, m in systems.items()},
                     task_wall[name])
        probe = self.copy_probe() if "entity" in self.config.tasks else None
        result = {
            "systems": systems,
            **({"copy_probe": probe} if probe else {}),
            "meta": {
                "bundle": self.bundle.manifest.get("name", Path(self.bundle.path).name),
                "bundle_path": _shown_path(self.bundle.path),
                "recipe": self.bundle.manifest.get("recipe", {}).get("name"),
                "memory_version": str(getattr(self.memory, "version", "unknown")),
                "memory_documents": _size(self.memory),
                "seed": self.config.seed,
                "n": dict(self.counts),
                "tasks": TASKS,
                "decoding": {"t2i": asdict(self.config.t2i),
                             "caption": asdict(self.config.caption),
                             "infill": asdict(self.config.infill)},
                "retrieval": {"k": self.config.k,
                              "diversity_threshold": self.diversity_threshold,
                              "mode": {s: self.retrieval_mode(s) for s in SYSTEMS
                                       if s != "cm3"},
                              "retrieval_only_image": "top neighbour's codes, VQ-decoded"},
                "device": self.engine.device,
                "torch_threads": torch.get_num_threads(),
                "task_wall_s": task_wall,
                "wall_s": round(time.perf_counter() - start, 2),
            },
        }
        return EvalOutput(result, self.grid_rows)


def evaluate(bundle: Any, memory: Any, config: EvalConfig | None = None) -> EvalOutput:
    """Every task for every system; `result["systems"][system][metric]`."""
    return Evaluator(bundle, memory, config).run()


def write_reports(output: EvalOutput, report_dir: str | Path | None,
                  json_path: str | Path | None = None) -> dict[str, Path]:
    """`eval.md` and `eval_grid.png` under report_dir, and the JSON, each only where asked."""
    import json

    paths: dict[str, Path] = {}
    if report_dir is not None:
        report_dir = Path(report_dir)
        if output.grid_rows:
            paths["grid"] = save_example_grid(output.grid_rows, report_dir / "eval_grid.png")
        paths["markdown"] = write_markdown(output.result, report_dir / "eval.md",
                                           output.grid_rows,
                                           "eval_grid.png" if output.grid_rows else None)
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(_jsonable(output.result), indent=2) + "\n")
        paths["json"] = json_path
    return paths


def record_in_manifest(output: EvalOutput, bundle_dir: str | Path) -> Path:
    """Write the systems' metrics (and how they were measured) into the bundle's
    manifest.json under `eval`, so that the bundle carries its own numbers."""
    import json

    path = Path(bundle_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    meta = output.result.get("meta", {})
    manifest["eval"] = _jsonable({
        "systems": output.result["systems"],
        "copy_probe": output.result.get("copy_probe"),
        "n": meta.get("n"), "seed": meta.get("seed"), "device": meta.get("device"),
        "memory_version": meta.get("memory_version"),
        "measured_at": time.strftime("%Y-%m-%d", time.gmtime()),
    })
    write_manifest(bundle_dir, manifest)  # atomic: never a half-written manifest
    return path


@dataclass
class NewEntityCheck:
    """Did a flag added to the memory (no retraining) reach RA-CM3's output?"""

    name: str
    retrieved: bool  # the top neighbour of "the flag of NAME" is one of the new documents
    top_caption: str  # that neighbour's caption
    ra_cm3_match: float  # fraction of samples whose nearest known flag is the new one
    cm3_match: float
    ra_cm3_distance: float  # mean |pixel - new flag| over samples, in 0..255
    cm3_distance: float
    samples: int

    @property
    def passed(self) -> bool:
        return self.retrieved and self.ra_cm3_match > max(0.5, self.cm3_match)


def new_entity_check(bundle: Any, memory_dir: str | Path, name: str, flag_image: np.ndarray,
                     samples: int = 4, seed: int = 0) -> NewEntityCheck:
    """Add "the flag of NAME" to the memory the way a user would (`racm3 build-index
    --source folder --append`), then ask RA-CM3 and CM3 for it.

    The flag is stored under every entity caption template, like the world's own
    entities. A sample "generates the entity" when, of every flag the world knows plus
    the new one, the new flag is the nearest to it in pixels.

    This publishes a new version of `memory_dir`: run it on a copy.
    """
    import tempfile

    from PIL import Image

    from retrieval.from_bundle import build_from_bundle
    from retrieval.memory import Memory

    flag = np.asarray(flag_image, dtype=np.uint8)
    attrs = {"kind": "entity", "entity": name}
    captions = [render_caption(attrs, t) for t in range(n_templates("entity"))]
    with tempfile.TemporaryDirectory() as folder:
        for t, text in enumerate(captions):
            Image.fromarray(flag).save(Path(folder) / f"{name}-{t}.png")
            (Path(folder) / f"{name}-{t}.txt").write_text(text)
        build_from_bundle(bundle, "folder", folder, memory_dir, append=True, progress=False)

    evaluator = Evaluator(bundle, Memory.load(memory_dir), EvalConfig(n=max(2, samples)))
    prompts = [captions[0]] * samples
    neighbours = evaluator.retrieve_for_texts(prompts)
    top_caption = evaluator.neighbour_caption(neighbours[0][0]) if neighbours[0] else ""
    retrieved = name.lower() in top_caption.lower()
    world = evaluator.world
    known = np.stack([world.render({"kind": "entity", "entity": e}) for e in world.entities]
                     + [flag]).astype(np.float32)
    out: dict[str, tuple[float, float]] = {}
    for system in DECODERS:
        images = evaluator.text_to_image(system, prompts, neighbours, seed).astype(np.float32)
        distance = np.abs(images[:, None] - known[None]).mean(axis=(2, 3, 4))  # (S, flags)
        out[system] = (float((distance.argmin(1) == len(known) - 1).mean()),
                       float(distance[:, -1].mean()))
    return NewEntityCheck(name, retrieved, top_caption,
                          ra_cm3_match=out["ra_cm3"][0], cm3_match=out["cm3"][0],
                          ra_cm3_distance=out["ra_cm3"][1], cm3_distance=out["cm3"][1],
                          samples=samples)


def append_to_memory(bundle_dir: str | Path, memory_dir: str | Path,
                     documents: Sequence[tuple[np.ndarray, str]]) -> None:
    """Append (image, caption) documents as a user would: write them to a folder and run
    `racm3 build-index --source folder --append` in its own process."""
    import subprocess
    import sys
    import tempfile

    from PIL import Image

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as folder:
        for i, (image, text) in enumerate(documents):
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(Path(folder) / f"{i:05d}.png")
            (Path(folder) / f"{i:05d}.txt").write_text(text)
        cmd = [sys.executable, "-m", "racm3.cli", "build-index", "--source", "folder",
               "--input", folder, "--out", str(Path(memory_dir).resolve()),
               "--bundle", str(Path(bundle_dir).resolve()), "--append"]
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"build-index --append failed: {done.stderr[-2000:]}")


def api_default_job(prompt: str, neighbours: list[NeighbourDoc], seed: int) -> T2IJob:
    """The job `/v1/images/generations` submits for a request that sets only the prompt
    (and the seed): every other setting is the API's default."""
    from app.schemas import ImageGenerationRequest

    body = ImageGenerationRequest(prompt=prompt, seed=seed)
    sampling = SamplingParams(seed=seed, temperature=body.temperature, top_k=body.top_k,
                              top_p=body.top_p, guidance_scale=body.guidance_scale)
    return T2IJob(prompt, neighbours, body.n, body.num_candidates or body.n, sampling,
                  retrieval_guidance=body.retrieval_guidance)


def api_default_caption_job(image: np.ndarray, neighbours: list[NeighbourDoc],
                            seed: int) -> CaptionJob:
    """The job `/v1/images/captions` submits for a request that sets only the image (and the
    seed): every other setting is the API's default."""
    from app.schemas import CaptionRequest

    body = CaptionRequest(image="", seed=seed)
    sampling = SamplingParams(seed=seed, temperature=body.temperature, top_k=body.top_k,
                              top_p=body.top_p)
    return CaptionJob(image, neighbours, body.n, body.num_candidates or body.n, sampling,
                      retrieval_guidance=body.retrieval_guidance)


def rephotographed(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image as a user's own copy of it might come back: a colour cast of up to ±16
    per channel and pixel noise (σ 6), on the 0..255 scale."""
    cast = rng.integers(-16, 17, size=3)
    noise = rng.normal(0.0, 6.0, size=image.shape)
    return np.clip(image.astype(np.float64) + cast + noise, 0, 255).round().astype(np.uint8)


def served_retrieval_mode() -> str:
    from app.settings import RetrieverSettings

    return str(RetrieverSettings.model_fields["retrieval_mode"].default)


def api_default_k() -> int:
    from app.settings import GatewaySettings

    return int(GatewaySettings.model_fields["default_k"].default)


DRAWN_MAX_DIFFERENCE = 40.0  # mean |pixel - flag| (0..255) under which a sample is the flag


def _way_jobs(make_job: Callable[[Any, list, int], Any], inputs: Sequence[Any],
              context: Sequence[list], base: int, weight: float | None) -> list[Any]:
    """One API-default job per input with its neighbours and seed `base + j`; `weight`
    (None: the served default) sets the retrieval guidance of one way of asking."""
    jobs = []
    for j, (x, nbs) in enumerate(zip(inputs, context, strict=True)):
        job = make_job(x, nbs, base + j)
        if weight is not None:
            job.retrieval_guidance = weight
        jobs.append(job)
    return jobs


def novel_flags_check(bundle: Any, memory_dir: str | Path, n_flags: int = 12,
                      samples: int = 4, seed: int = 0) -> dict[str, Any]:
    """Flags of kinds the world never makes (world/novel_flags.py), appended to
    `memory_dir` with `build-index --append`, then asked for under two phrasings each
    through the engine call the API makes, with the API's default settings.

    A sample is the flag when its mean absolute pixel difference to it is under
    `DRAWN_MAX_DIFFERENCE`. Three ways of asking: `ra_cm3` (the API's defaults,
    retrieval on), `ra_cm3_paper` (the paper's method: dense retrieval, guidance 0),
    `retrieval_off` (the API's `retrieval.enabled: false`). `vq_drawable`: the share of
    flags the image tokenizer itself reproduces under the threshold, the ceiling of any
    decoder.

    Captions go the other way: each flag's image, and a re-photographed copy of it
    (`rephotographed`), is captioned through the engine call `/v1/images/captions` makes, with
    its defaults, the neighbours retrieved by the image as the service retrieves them
    (`caption_retrieved`: the flag's document is among them); `caption_named`: the
    caption has the flag's name.

    This publishes a new version of `memory_dir`: run it on a copy.
    """
    from retrieval.memory import Memory
    from world.novel_flags import novel_flags

    world = World(WorldConfig.from_dict(bundle.manifest["world"]))
    flags = novel_flags(world, n_flags, seed)
    append_to_memory(bundle.path, memory_dir,
                     [(f.image, c) for f in flags for c in f.captions])
    evaluator = Evaluator(bundle, Memory.load(memory_dir),
                          EvalConfig(n=2, k=api_default_k()))
    engine = evaluator.engine
    images = np.stack([f.image for f in flags])
    vq_distance = np.abs(engine.decode_codes(engine.encode_images(list(images)))
                         .astype(np.float32) - images).mean(axis=(1, 2, 3))
    asks = [(f, i, p) for i, f in enumerate(flags) for p in f.prompts]
    prompts = [p for _, _, p in asks for _ in range(samples)]
    targets = np.stack([images[i] for _, i, _ in asks for _ in range(samples)]).astype(np.float32)
    neighbours = evaluator.retrieve_for_texts(prompts)
    retrieved = [bool(nbs) and f.name.lower() in evaluator.neighbour_caption(nbs[0]).lower()
                 for (f, _, _), nbs in zip(asks, neighbours[::samples], strict=True)]
    base = 7_000_000 + seed * 10_000
    ways = {"ra_cm3": (neighbours, None),
            "ra_cm3_paper": (evaluator.retrieve_for_texts(prompts, "dense"), 0.0),
            "retrieval_off": ([[] for _ in prompts], None)}
    distance: dict[str, np.ndarray] = {}
    for way, (context, weight) in ways.items():
        jobs = _way_jobs(api_default_job, prompts, context, base, weight)
        results = evaluator._batched(engine.text_to_image, jobs)
        out = np.stack([r[0].image for r in results]).astype(np.float32)
        distance[way] = np.abs(out - targets).mean(axis=(1, 2, 3))
    drawn = {w: d < DRAWN_MAX_DIFFERENCE for w, d in distance.items()}
    captions = _novel_flag_captions(evaluator, flags, seed)
    rows = []
    for a, (f, i, p) in enumerate(asks):
        part = slice(a * samples, (a + 1) * samples)
        rows.append({"name": f.name, "layout": f.layout, "prompt": p,
                     "retrieved_first": retrieved[a],
                     "vq_distance": float(vq_distance[i]),
                     **{f"{w}_drawn": float(drawn[w][part].mean()) for w in ways},
                     **{f"{w}_distance": float(distance[w][part].mean()) for w in ways}})
    return {
        "drawn": {w: float(d.mean()) for w, d in drawn.items()},
        "retrieved_first": float(np.mean(retrieved)),
        "vq_drawable": float((vq_distance < DRAWN_MAX_DIFFERENCE).mean()),
        "flags": len(flags), "layouts": len({f.layout for f in flags}),
        "prompts_per_flag": len(flags[0].prompts) if flags else 0,
        "samples": samples, "threshold": DRAWN_MAX_DIFFERENCE,
        "settings": "API defaults (ImageGenerationRequest with only prompt and seed)",
        "rows": rows,
        **captions,
    }


def _novel_flag_captions(evaluator: Evaluator, flags: Sequence[Any], seed: int
                         ) -> dict[str, Any]:
    """Caption each appended flag's image and a re-photographed copy with the API's
    defaults: retrieval as served, the paper's (dense retrieval, guidance 0), and off."""
    rng = np.random.default_rng([seed, 17])
    images = np.stack([f.image for f in flags] + [rephotographed(f.image, rng) for f in flags])
    names = [f.name.lower() for f in flags] * 2
    kinds = ["exact"] * len(flags) + ["rephotographed"] * len(flags)
    served = evaluator.retrieve_for_images(images)
    ways = {"ra_cm3": (served, None),
            "ra_cm3_paper": (evaluator.retrieve_for_images(images, "dense"), 0.0),
            "retrieval_off": ([[] for _ in images], None)}
    base = 8_000_000 + seed * 10_000
    named: dict[str, np.ndarray] = {}
    retrieved: dict[str, np.ndarray] = {}
    for way, (context, weight) in ways.items():
        jobs = _way_jobs(api_default_caption_job, images, context, base, weight)
        texts = [r[0].text for r in evaluator._batched(evaluator.engine.caption, jobs)]
        named[way] = np.array([n in t.lower() for n, t in zip(names, texts, strict=True)])
        retrieved[way] = np.array([any(n in evaluator.neighbour_caption(d).lower() for d in nbs)
                                   for n, nbs in zip(names, context, strict=True)])
    by_kind = {k: np.array([x == k for x in kinds]) for k in ("exact", "rephotographed")}
    return {
        "caption_named": {w: float(v.mean()) for w, v in named.items()},
        "caption_named_by_image": {k: {w: float(v[m].mean()) for w, v in named.items()}
                                   for k, m in by_kind.items()},
        "caption_retrieved": {w: float(v.mean()) for w, v in retrieved.items()
                              if w != "retrieval_off"},
        "caption_settings": "API defaults (CaptionRequest with only image and seed)",
    }


def novel_flag(world: World, seed: int = 0) -> np.ndarray:
    """A flag unlike every flag of the world (>= 25% of pixels differ from each)."""
    from world.entities import MIN_FLAG_DIFFERENCE, flag_patterns
    from world.rng import Rng

    rng = Rng.from_key("racm3-novel-flag", world.config.seed, seed)
    size = world.config.image_size
    known = np.stack([world.render({"kind": "entity", "entity": e}) for e in world.entities])
    for _ in range(1000):
        flag = flag_patterns(1, rng, size)[0].render(size)
        differs = (known != flag[None]).any(-1).mean(axis=(1, 2))
        if differs.min() >= MIN_FLAG_DIFFERENCE:
            return flag
    raise ValueError("could not draw a flag distinct from the world's")


def object_box_mask(image: np.ndarray, patch: int) -> np.ndarray:
    """(H, W) bool: the bounding box of the non-background pixels, grown to whole VQ
    patches so that exactly the covered codes are regenerated and nothing half-kept.

    The background is the image's most common colour (objects cover < a third of it).
    """
    flat = image.reshape(-1, 3)
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    foreground = (image != colours[counts.argmax()]).any(axis=-1)
    mask = np.zeros(image.shape[:2], dtype=bool)
    if not foreground.any():
        raise ValueError("the image has no object to mask")
    ys, xs = np.nonzero(foreground)
    y0, x0 = (ys.min() // patch) * patch, (xs.min() // patch) * patch
    y1, x1 = -(-(ys.max() + 1) // patch) * patch, -(-(xs.max() + 1) // patch) * patch
    mask[y0:y1, x0:x1] = True
    return mask


def _interleave(a: Sequence, b: Sequence) -> list:
    """a0 b0 a1 b1 …, then the rest of the longer one: a prefix of any length mixes both."""
    out = []
    for i in range(max(len(a), len(b))):
        out += [x[i] for x in (a, b) if i < len(x)]
    return out


def _cycle_templates(pool: Sequence[Attributes], n: int) -> list[tuple[str, Attributes]]:
    """n (caption, attributes): the pool under template 0, then template 1, … and round
    again (seeds differ by position, so a repeated prompt is a new sample)."""
    if not pool:
        return []
    out = []
    for i in range(n):
        attrs = pool[i % len(pool)]
        template = (i // len(pool)) % n_templates(attrs["kind"])
        out.append((render_caption(attrs, template), attrs))
    return out


def _n_variants(world: World, attrs: Attributes) -> int:
    # World has no public variant count yet; its renderer owns the jitter radices.
    public = getattr(world, "n_variants", None)
    return int(public(attrs)) if public is not None else world._renderer.n_variants(attrs)


def _shown_path(path: str | Path) -> str:
    """A path as the report shows it: relative to the working directory when under it,
    so a report does not carry the machine's layout."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _size(memory: Any) -> int | None:
    try:
        return len(memory)
    except TypeError:
        return None


def _jsonable(value: Any) -> Any:
    """NaN/inf become null: JSON has no spelling for them."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value
