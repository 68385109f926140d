"""The generation engine: RA-CM3 inference for every task, batch-oriented.

Every task is one prompt form (docs/architecture.md, "The method"), decoded with the KV
cache and a modality constraint, with the retrieved documents in context:

- caption→image: `[nb, <break>]* <img alt="caption" src="` → exactly grid-size codes.
  Classifier-free guidance runs an unconditional stream beside it, CM3Leon style: the
  caption is replaced by `<mask:0>` (and the retrieved documents are left out, since they
  were chosen by the caption). Candidates are reranked by CLIP score against the prompt
  plus their agreement with the retrieved images (`rerank_scores`).
- image→caption: `[nb, <break>]* <img alt="<mask:0>" src="[image]"><mask:0>` → text
  until `<eos>`; candidates are reranked by likelihood.
- infilling / editing: the code runs under the mask become `<mask:i>`, the spans are
  generated in order with their exact lengths; codes outside the mask are kept exactly.
  Editing is infilling whose document carries the new caption.
- classification: the label whose caption is most likely as the image's caption, with
  the examples (and neighbours) in context.

Per-request seeds are per-row torch generators, so a job's output does not depend on
which other jobs were batched with it.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np
import torch

from model import retrieval_guidance as guidance
from model.decoder import CM3Decoder, left_pad
from model.fast_decode import FastDecode, FastDecodeOptions
from model.jobs import (
    CaptionJob,
    ClassifyJob,
    ClassifyResult,
    GeneratedCaption,
    GeneratedImage,
    InfillJob,
    NeighbourDoc,
    T2IJob,
    Unfit,
)
from model.masking import infill_prompt_from_runs
from model.partial import ProgressHook
from model.sampling import (
    DocState,
    InfillSpan,
    ModalityConstraint,
    SamplingParams,
    SpanConstraint,
    make_generator,
)
from model.tokens import (
    BREAK_ID,
    EOS_ID,
    IMG_CLOSE_ID,
    IMG_OPEN_ID,
    PAD_ID,
    SRC_ID,
    TokenSpace,
    assemble,
    mask_id,
)

MAX_CAPTION_TOKENS = 32
MAX_MASK_RUNS = 16  # infilling regenerates at most this many runs (`_runs_capped`)
J = TypeVar("J", T2IJob, CaptionJob, InfillJob)
# Weight of the VQ-code agreement with the retrieved images in the t2i ranking
# (`rerank_scores`): CLIP cannot tell one unseen flag from another, while equal codes at
# equal cells can; the prompt's CLIP score still matters where the neighbours differ from
# the prompt. Chosen on prompts and seeds outside the eval's (the sweep is in
# BENCHMARKS.md).
CODE_AGREEMENT_WEIGHT = 2.0


class Engine:
    def __init__(
        self,
        decoder: CM3Decoder,
        space: TokenSpace,
        tokenizer: Any,
        vq: Any,
        clip: Any,
        manifest: dict | None = None,
        image_size: int = 32,
        device: str = "cpu",
        name: str = "ra_cm3",
        fast: FastDecodeOptions | None = None,
    ) -> None:
        self.decoder = decoder.eval()
        if device == "cpu":
            self.decoder.use_decode_layout()  # same values; faster decoding products
        self.space = space
        self.tokenizer = tokenizer
        self.vq = vq
        self.clip = clip
        self.manifest = manifest or {}
        self.image_size = image_size
        self.device = device
        self.name = name
        self._tokens = 0
        # bf16 on CUDA: the decoder's matmuls are the cost; sampling stays in fp32
        self._autocast = device.startswith("cuda")
        fast = fast or FastDecodeOptions()
        self.fast = FastDecode(self.decoder, fast) if fast.enabled else None

    @classmethod
    def from_bundle(cls, bundle: Any, decoder: str = "ra_cm3",
                    fast: FastDecodeOptions | None = None) -> Engine:
        return cls(
            bundle.decoder(decoder),
            bundle.space,
            bundle.tokenizer,
            bundle.vq,
            bundle.clip,
            manifest=bundle.manifest,
            image_size=bundle.image_size,
            device=bundle.device,
            name=decoder,
            fast=fast,
        )

    # --- protocol --------------------------------------------------------------------

    @property
    def tokens_generated(self) -> int:
        return self._tokens

    def info(self) -> dict[str, Any]:
        return {
            "image_size": [self.image_size, self.image_size],
            "grid": list(self.space.image_grid),
            "decoder": self.name,
            "decoder_params": self.decoder.num_params(),
            "device": self.device,
            "retrieval_guidance": {"default": guidance.DEFAULT_WEIGHT,
                                   "range": [0.0, guidance.MAX_WEIGHT]},
            "fast_decode": None if self.fast is None else self.fast.describe(),
            "window": self.window(),
            "manifest": self.manifest,
        }

    # --- what fits the decoder's window ------------------------------------------------

    def window(self) -> dict[str, int]:
        """The decoder's window and what a request may put in it.

        - `max_k`: the most retrieved documents that can ever be in context together:
          image-only documents beside the shortest prompt (text to image). Documents
          beyond what fits a given request are left out, best last (`context_ids`).
        - `max_prompt_tokens`: the longest prompt (BPE tokens) text to image takes: the
          prompt and the image it generates fill the window.
        - `max_edit_prompt_tokens`: the longest prompt infilling and editing take with
          any mask (it may need up to 16 sentinels twice, see `_runs_capped`).
        """
        block, n = self.decoder.config.block_size, self.space.image_len
        document = n + 4  # <img src="[codes]"> <break>, no caption
        return {
            "tokens": block,
            "max_k": max(0, (block - self._t2i_tokens(1)) // document),
            "max_prompt_tokens": max(0, block - self._t2i_tokens(0)),
            "max_edit_prompt_tokens": max(0, block - self._infill_tokens(0, MAX_MASK_RUNS)),
        }

    def _t2i_tokens(self, prompt_tokens: int) -> int:
        # <img alt="prompt" src=" + the codes generated
        return prompt_tokens + 2 + self.space.image_len

    def _infill_tokens(self, text_tokens: int, runs: int) -> int:
        # the document, a sentinel per run in place, the first sentinel again, and per
        # run its codes and the sentinel before it (or <eos>) generated
        return 3 + text_tokens + self.space.image_len + 2 * runs + 1

    @property
    def _caption_tokens(self) -> int:
        # <img alt="<mask:0>" src="[codes]"><mask:0> + the caption and <eos> generated
        return self.space.image_len + 5 + MAX_CAPTION_TOKENS + 1

    def fit(self, task: str, job: Any) -> None:
        """Raise `Unfit` when the job cannot run: the worker asks before the job joins a
        batch, so one request the engine cannot take is refused alone (a 422), never
        failing the jobs batched with it. Retrieved documents and demonstrations need no
        check: those that do not fit beside the main document are left out."""
        if task != "classify":
            _fit_sampling(job)
        block = self.decoder.config.block_size
        if task == "text_to_image":
            prompt = len(self.tokenizer.encode(job.prompt))
            if self._t2i_tokens(prompt) > block:
                raise Unfit(
                    f"the prompt is {prompt} tokens; with the {self.space.image_len} image "
                    f"tokens generated after it, the decoder's window of {block} tokens "
                    f"holds a prompt of at most {block - self._t2i_tokens(0)} tokens",
                    param="prompt", code="context_length_exceeded")
        elif task == "caption":
            if self._caption_tokens > block:
                raise Unfit(f"this decoder's window ({block} tokens) cannot hold an image "
                            "and its caption", param="image")
        elif task == "infill":
            self._fit_infill(job, block)
        elif task == "classify":
            self._fit_classify(job, block)
        else:
            raise Unfit(f"unknown task {task!r}")

    def _fit_infill(self, job: InfillJob, block: int) -> None:
        if job.mask.shape != job.image.shape[:2]:
            raise Unfit(f"the mask is {job.mask.shape[1]}x{job.mask.shape[0]} but the image "
                        f"is {job.image.shape[1]}x{job.image.shape[0]}", param="mask")
        cells = np.flatnonzero(self.code_mask(job.mask).reshape(-1))
        if cells.size == 0:
            raise Unfit("the mask covers no part of the image", param="mask",
                        code="empty_mask")
        runs = len(_runs_capped(cells))
        # without a prompt the engine captions the image first (`_self_caption`)
        text = (len(self.tokenizer.encode(job.prompt)) if job.prompt
                else MAX_CAPTION_TOKENS)
        need = self._infill_tokens(text, runs)
        if need > block:
            most = block - self._infill_tokens(0, runs)
            raise Unfit(
                f"the prompt is {text} tokens; with the image and the {runs} masked "
                f"region(s), the decoder's window of {block} tokens holds a prompt of at "
                f"most {most} tokens", param="prompt", code="context_length_exceeded")

    def _fit_classify(self, job: ClassifyJob, block: int) -> None:
        if not job.labels:
            raise Unfit("give at least one label", param="labels")
        examples = sum(len(self._classify_example(e.caption)) for e in job.examples)
        label = max(len(self.tokenizer.encode(lbl)) for lbl in job.labels) + 1
        need = examples + self.space.image_len + 5 + label
        if need > block:
            raise Unfit(
                f"the image, its {len(job.examples)} example(s) and the longest label need "
                f"{need} tokens; the decoder's window holds {block}",
                param="examples" if job.examples else "labels",
                code="context_length_exceeded")

    def _classify_example(self, caption: str, codes: np.ndarray | None = None) -> list[int]:
        if codes is None:
            codes = np.zeros(self.space.image_grid, dtype=np.int64)
        return [*self.doc_ids(self.tokenizer.encode(caption), codes), BREAK_ID]

    def warmup(self) -> None:
        job = T2IJob("a red square", [], n=1, num_candidates=1,
                     sampling=SamplingParams(seed=0, temperature=1.0))
        self.text_to_image([job])
        if self.fast is not None:  # compile the decode step for the batches to come
            self.fast.warmup()

    def fast_decode_stats(self) -> dict[str, Any] | None:
        """The fast path's counters (prefix cache hits, misses, bytes), None when it is off."""
        return None if self.fast is None else self.fast.stats()

    # --- building blocks ---------------------------------------------------------------

    def doc_ids(self, caption_ids: Sequence[int] | None, codes: np.ndarray | None) -> list[int]:
        return self.space.document_ids(caption_ids, codes)

    def context_ids(self, neighbours: Sequence[NeighbourDoc], reserve: int | None = None,
                    ) -> list[int]:
        """`[retrieved doc, <break>]*`, best neighbour first (as in training).

        Only the documents that fit the decoder's window beside `reserve` tokens (the main
        document and what will be generated) are kept, best first: a request retrieving
        more than the window holds is answered with fewer documents rather than failing
        the batch it joined."""
        budget = self.decoder.config.block_size - (
            self.default_reserve if reserve is None else reserve)
        docs: list[list[int]] = []
        used = 0
        for nb in neighbours:
            codes = None if nb.image_codes is None else np.asarray(nb.image_codes).reshape(
                self.space.image_grid)
            text = nb.text_ids
            if text is None and nb.caption:
                text = self.tokenizer.encode(nb.caption)
            doc = self.doc_ids(text, codes)
            used += len(doc) + 1  # and its <break>
            if used > budget:
                break
            docs.append(doc)
        return assemble(docs, [], eos=False).ids

    @property
    def default_reserve(self) -> int:
        # a whole document (caption and image) plus a caption's or an image's generation
        return 2 * self.space.image_len + 2 * MAX_CAPTION_TOKENS + 16

    def _check_fits(self, prompt_len: int, new_tokens: int) -> None:
        limit = self.decoder.config.block_size
        if prompt_len + new_tokens > limit:
            raise Unfit(f"the request needs {prompt_len + new_tokens} tokens; the "
                        f"decoder's window holds {limit}", code="context_length_exceeded")

    def _stopped_rows(self, group: Sequence[Any], per_job: int,
                      ) -> Callable[[], torch.Tensor | None] | None:
        """The decoder's `stopped` callback for one decode call: every row of a job that
        nobody wants any more (its `stop` flag set, or its stream cancelled)."""
        if not any(_stoppable(j) for j in group):
            return None

        def stopped() -> torch.Tensor | None:
            gone = [g for g, j in enumerate(group) if _gone(j)]
            if not gone:
                return None
            rows = torch.zeros(len(group) * per_job, dtype=torch.bool)
            for g in gone:
                rows[g * per_job : (g + 1) * per_job] = True
            return rows

        return stopped

    def with_examples(self, jobs: list[J]) -> list[J]:
        """Jobs whose demonstrations (`examples`) lead their neighbours as documents in
        context: the same layout, placed first, so the model reads them as it reads
        retrieved documents, and the ranking compares candidates with them too."""
        images = [e.image for j in jobs for e in j.examples]
        if not images:
            return jobs
        codes = iter(self.encode_images(images))
        return [
            replace(j, examples=[], neighbours=[
                *(NeighbourDoc(-1, 1.0, e.caption, self.tokenizer.encode(e.caption), next(codes))
                  for e in j.examples),
                *j.neighbours,
            ])
            for j in jobs
        ]

    def encode_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.vq.encode_images(images)

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        return self.vq.decode_codes(codes)

    def _params(self, s: SamplingParams, max_new: int) -> SamplingParams:
        return replace(s, max_new_tokens=max_new)

    def _generate(self, prompts, params: SamplingParams, generators, constraints,
                  uncond=None, num_samples: int = 1, logits_processor=None,
                  progress: ProgressHook | None = None, stopped=None) -> torch.Tensor:
        idx, mask = left_pad(prompts, device=self.device)
        u_idx = u_mask = None
        if uncond is not None:
            u_idx, u_mask = left_pad(uncond, device=self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._autocast):
            prefilled = None
            if self.fast is not None:
                guided = uncond is not None and params.guidance_scale != 1.0
                prefilled = self.fast.prefill(prompts, uncond if guided else None,
                                              num_samples, params.max_new_tokens)
            out = self.decoder.generate(
                idx, params, attention_mask=mask, uncond_idx=u_idx, uncond_mask=u_mask,
                num_samples=num_samples, constraints=constraints, generator=generators,
                step_hook=progress,
                logits_processor=logits_processor,
                prefilled=prefilled,
                stopped=stopped,
            )
        self._tokens += int((out != PAD_ID).sum())
        out = out.cpu()
        return out if progress is None else progress.settle(out, params.max_new_tokens)

    @staticmethod
    def _group(jobs: Sequence[Any]) -> dict[tuple, list[int]]:
        # one decode call per distinct sampling setting: a batch shares one logits transform
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            s = job.sampling
            key = (s.temperature, s.top_k, s.top_p, s.guidance_scale,
                   getattr(job, "retrieval_guidance", None), job.num_candidates)
            groups[key].append(i)
        return groups

    def _row_generators(self, seeds: Sequence[int], per_job: int) -> list[torch.Generator]:
        # Sample j of a job draws from a stream keyed by (seed, j): reproducible whatever
        # else shares the batch, and requests with seeds s and s+1 share no candidate.
        return [make_generator(_mix(seed, j), self.device)
                for seed in seeds for j in range(per_job)]

    def log_likelihood(self, prompts: Sequence[list[int]], continuations: Sequence[list[int]],
                       ) -> list[float]:
        """Sum of log p(continuation | prompt) per pair, in one right-padded forward."""
        seqs = [list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)]
        T = max(len(s) for s in seqs)
        idx = torch.full((len(seqs), T), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.bool)
        for b, s in enumerate(seqs):
            idx[b, : len(s)] = torch.as_tensor(s)
            mask[b, : len(s)] = True
        with torch.inference_mode(), torch.autocast(
                "cuda", dtype=torch.bfloat16, enabled=self._autocast):
            logits, _ = self.decoder(idx.to(self.device), attention_mask=mask.to(self.device))
        logp = logits.float().log_softmax(-1).cpu()
        out = []
        for b, (p, c) in enumerate(zip(prompts, continuations, strict=True)):
            pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)
            out.append(float(logp[b, pos, torch.as_tensor(c)].sum()))
        return out

    # --- tasks -------------------------------------------------------------------------

    def text_to_image(self, jobs: list[T2IJob]) -> list[list[GeneratedImage]]:
        jobs = self.with_examples(jobs)
        results: list[list[GeneratedImage]] = [[] for _ in jobs]
        for key, members in self._group(jobs).items():
            n_cand = key[-1]
            members = [i for i in members if not _gone(jobs[i])]
            if not members:
                continue
            group = [jobs[i] for i in members]
            caps = [self.space.text_to_ids(self.tokenizer.encode(j.prompt)) for j in group]
            for c in caps:
                self._check_fits(len(c) + 2, self.space.image_len)
            prompts = [
                [*self.context_ids(j.neighbours, len(c) + 2 + self.space.image_len),
                 IMG_OPEN_ID, *c, SRC_ID]
                for j, c in zip(group, caps, strict=True)
            ]
            uncond = [[IMG_OPEN_ID, mask_id(0), SRC_ID]] * len(group)
            params = self._params(group[0].sampling, self.space.image_len)
            constraints = [ModalityConstraint(self.space, DocState.SRC,
                                              vocab_size=self.decoder.config.vocab_size)
                           for _ in range(len(group) * n_cand)]
            out = self._generate(
                prompts, params, self._row_generators([j.sampling.seed for j in group], n_cand),
                constraints, uncond=uncond if params.guidance_scale != 1.0 else None,
                num_samples=n_cand, logits_processor=self._image_copy(group, n_cand),
                progress=ProgressHook.for_images(
                    self.space, self.decode_codes, group, prompts, n_cand),
                stopped=self._stopped_rows(group, n_cand),
            )
            kept = _wanted(group)  # the others' clients left: their rows are not finished
            if not kept:
                continue
            if len(kept) < len(group):
                out = out[_rows(kept, n_cand)]
                group, members = [group[g] for g in kept], [members[g] for g in kept]
            codes = self.space.ids_to_codes(out[:, : self.space.image_len].reshape(-1)).reshape(
                len(group) * n_cand, *self.space.image_grid)
            images = self.decode_codes(codes)
            scores, ranks = self.rerank_scores(group, images, n_cand, codes)
            for g, (i, job) in enumerate(zip(members, group, strict=True)):
                rows = range(g * n_cand, (g + 1) * n_cand)
                best = sorted(rows, key=lambda r: -ranks[r])[: job.n]
                results[i] = [GeneratedImage(images[r], float(scores[r]), codes[r]) for r in best]
        return results

    @functools.cached_property
    def rarity(self) -> guidance.WordRarity:
        return guidance.WordRarity(self.tokenizer)

    def _image_copy(self, jobs: Sequence[T2IJob], per_job: int) -> guidance.ImageCopy | None:
        """The neighbours' codes to mix into each row's sampling; None when nothing is
        relevant (then decoding is exactly the paper's)."""
        sources = [guidance.image_copy_source(self.space, j.prompt, j.neighbours, self.rarity,
                                              _guidance_weight(j)) for j in jobs]
        if not any(sources):
            return None
        return guidance.ImageCopy([s for s in sources for _ in range(per_job)],
                                  self.space.image_len, self.device)

    def _caption_pointer(self, jobs: Sequence[CaptionJob], codes: np.ndarray, per_job: int,
                         ) -> guidance.CaptionPointer | None:
        weights = {_guidance_weight(j) for j in jobs}  # one per group (see `_group`)
        weight = weights.pop()
        if weight <= 0:
            return None
        words = [guidance.pointed_words(self.space, c, j.neighbours, self.rarity)
                 for j, c in zip(jobs, codes, strict=True)]
        if not any(words):
            return None
        return guidance.CaptionPointer(
            [w for w in words for _ in range(per_job)], weight,
            self.rarity.rare_token_mask(self.space, self.decoder.config.vocab_size))

    def clip_scores(self, prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
        text = self.clip.encode_text(list(prompts))
        image = self.clip.encode_image(images)
        return (text * image).sum(-1)

    def rerank_scores(self, jobs: Sequence[T2IJob], images: np.ndarray, per_job: int,
                      codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(CLIP score against the prompt, ranking score) per candidate image.

        The ranking score adds the candidate's agreement with the job's retrieved images:
        its mean CLIP image similarity to them, plus `CODE_AGREEMENT_WEIGHT` times the
        mean fraction of grid cells where its VQ code (`codes`, (N, h, w)) equals theirs.
        CLIP finds an entity that only the memory knows by its caption, but it never saw
        that entity's image, so neither its prompt score nor its image embedding tells
        the right flag from a wrong one; the retrieved images are the memory's statement
        of what the prompt looks like, and their codes say it exactly. Jobs without
        retrieved images (CM3, K=0) rank by the prompt score alone. A neighbour's image
        vector is the one it carries from the memory (`NeighbourDoc.image_vector`, the
        same CLIP vector of the same reconstruction), or is computed here.
        """
        image = self.clip.encode_image(images)
        prompts = self.clip.encode_text([j.prompt for j in jobs for _ in range(per_job)])
        scores = (prompts * image).sum(-1)
        ranks = scores.copy()
        if per_job == 1:  # a lone candidate needs no ranking: skip decoding the neighbours
            return scores, ranks
        # every job's retrieved images: the vectors the memory stored with them, and the
        # others (examples, a memory built without them) in one VQ decode and CLIP call
        owners, memory_codes, carried = [], [], []
        for g, job in enumerate(jobs):
            for d in job.neighbours:
                if d.image_codes is not None:
                    owners.append(g)
                    memory_codes.append(np.asarray(d.image_codes).reshape(self.space.image_grid))
                    v = d.image_vector
                    carried.append(v if v is not None and np.shape(v) == image.shape[1:]
                                   else None)
        if not memory_codes:
            return scores, ranks
        stacked = np.stack(memory_codes)
        missing = [i for i, v in enumerate(carried) if v is None]
        memory = np.zeros((len(carried), image.shape[1]), dtype=np.float32)
        if missing:
            memory[missing] = self.clip.encode_image(self.decode_codes(stacked[missing]))
        for i, v in enumerate(carried):
            if v is not None:
                memory[i] = v
        owners_arr = np.asarray(owners)
        codes = None if codes is None else np.asarray(codes)
        for g in set(owners):
            rows = slice(g * per_job, (g + 1) * per_job)
            mine = owners_arr == g
            ranks[rows] += (image[rows] @ memory[mine].T).mean(1)
            if codes is not None:
                same = codes[rows, None] == stacked[mine][None]  # (C, K, h, w)
                ranks[rows] += CODE_AGREEMENT_WEIGHT * same.mean(axis=(1, 2, 3))
        return scores, ranks

    def _caption_prompt(self, context: list[int], codes: np.ndarray) -> list[int]:
        return [*context, IMG_OPEN_ID, mask_id(0), SRC_ID, *self.space.codes_to_ids(codes),
                IMG_CLOSE_ID, mask_id(0)]

    def caption(self, jobs: list[CaptionJob]) -> list[list[GeneratedCaption]]:
        jobs = self.with_examples(jobs)
        results: list[list[GeneratedCaption]] = [[] for _ in jobs]
        all_codes = self.encode_images([j.image for j in jobs])
        for key, members in self._group(jobs).items():
            n_cand = key[-1]
            members = [i for i in members if not _gone(jobs[i])]
            if not members:
                continue
            group = [jobs[i] for i in members]
            prompts = [self._caption_prompt(self.context_ids(j.neighbours), all_codes[i])
                       for i, j in zip(members, group, strict=True)]
            params = self._params(group[0].sampling, MAX_CAPTION_TOKENS + 1)
            constraints = [SpanConstraint(self.space, [InfillSpan("text")],
                                          vocab_size=self.decoder.config.vocab_size)
                           for _ in range(len(group) * n_cand)]
            out = self._generate(
                prompts, params, self._row_generators([j.sampling.seed for j in group], n_cand),
                constraints, num_samples=n_cand,
                logits_processor=self._caption_pointer(group, all_codes[members], n_cand),
                stopped=self._stopped_rows(group, n_cand),
            )
            kept = _wanted(group)
            if not kept:
                continue
            if len(kept) < len(group):
                out = out[_rows(kept, n_cand)]
                group, members = [group[g] for g in kept], [members[g] for g in kept]
                prompts = [prompts[g] for g in kept]
            texts_ids = [[int(t) for t in row if self.space.is_text(int(t))] for row in out]
            row_prompts = [p for p in prompts for _ in range(n_cand)]
            # likelihood of caption + <eos>, so an unfinished caption is not favoured
            scores = self.log_likelihood(row_prompts, [[*t, EOS_ID] for t in texts_ids])
            for g, (i, job) in enumerate(zip(members, group, strict=True)):
                rows = sorted(range(g * n_cand, (g + 1) * n_cand), key=lambda r: -scores[r])
                seen, picked = set(), []
                for r in rows:  # distinct captions first: n copies of one caption help no one
                    text = self.tokenizer.decode(self.space.ids_to_text(texts_ids[r]))
                    if text not in seen:
                        seen.add(text)
                        picked.append(GeneratedCaption(text, float(scores[r])))
                results[i] = picked[: job.n] or [GeneratedCaption("", float("-inf"))]
        return results

    def code_mask(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) pixel mask → (h, w) code mask: a code is regenerated if any pixel is."""
        h, w = self.space.image_grid
        H, W = mask.shape
        return mask.reshape(h, H // h, w, W // w).any(axis=(1, 3))

    def infill(self, jobs: list[InfillJob]) -> list[list[GeneratedImage]]:
        jobs = self.with_examples(jobs)
        results: list[list[GeneratedImage]] = [[] for _ in jobs]
        all_codes = self.encode_images([j.image for j in jobs])
        for key, members in self._group(jobs).items():
            n_cand = key[-1]
            texts: dict[int, str] = {}
            infills: dict[int, Any] = {}
            for i in members:
                if _gone(jobs[i]):
                    continue
                job, codes = jobs[i], all_codes[i]
                texts[i] = job.prompt or self._self_caption(job, codes)
                doc = self.doc_ids(self.tokenizer.encode(texts[i]), codes)
                src = doc.index(SRC_ID) + 1
                cells = np.flatnonzero(self.code_mask(job.mask).reshape(-1))
                infills[i] = infill_prompt_from_runs(doc, _runs_capped(src + cells))
            # One decode holds every row's prompt and the most tokens any row generates:
            # jobs that would not fit the window together decode apart.
            for part in self._fitting_parts(list(infills), infills):
                self._infill_part(jobs, part, n_cand, all_codes, texts, infills, results)
        return results

    def _fitting_parts(self, members: list[int], infills: dict[int, Any]) -> list[list[int]]:
        """`members` split, in order, into parts whose longest infilling prompt plus most
        generated tokens fit the window (each job alone fits: `fit` made sure)."""
        block = self.decoder.config.block_size
        parts: list[tuple[list[int], int, int]] = []  # (members, longest prompt, most new)
        for i in members:
            ip = infills[i]
            length, new = len(ip.ids), _new_tokens(ip)
            for p, (part, longest, most) in enumerate(parts):
                if max(longest, length) + max(most, new) <= block:
                    parts[p] = ([*part, i], max(longest, length), max(most, new))
                    break
            else:
                parts.append(([i], length, new))
        return [part for part, _, _ in parts]

    def _infill_part(self, jobs: list[InfillJob], members: list[int], n_cand: int,
                     all_codes: np.ndarray, texts: dict[int, str], infills: dict[int, Any],
                     results: list[list[GeneratedImage]]) -> None:
        group = [jobs[i] for i in members]
        ips = [infills[i] for i in members]
        max_new = max(_new_tokens(ip) for ip in ips)
        # retrieved documents only where they fit beside the prompt and the generation
        prompts = [[*self.context_ids(job.neighbours, len(ip.ids) + max_new), *ip.ids]
                   for job, ip in zip(group, ips, strict=True)]
        constraints = [SpanConstraint.image_runs(
            self.space, ip.run_lengths, vocab_size=self.decoder.config.vocab_size)
            for ip in ips for _ in range(n_cand)]
        params = self._params(group[0].sampling, max_new)
        out = self._generate(
            prompts, params, self._row_generators([j.sampling.seed for j in group], n_cand),
            constraints, num_samples=n_cand,
            progress=ProgressHook.for_infill(
                self.space, self.decode_codes, group, prompts, ips,
                [all_codes[i] for i in members], n_cand),
            stopped=self._stopped_rows(group, n_cand),
        )
        kept = _wanted(group)
        if not kept:
            return
        if len(kept) < len(group):
            out = out[_rows(kept, n_cand)]
            members = [members[g] for g in kept]
            group, ips = [group[g] for g in kept], [ips[g] for g in kept]
        all_codes_out = []
        for g, ip in enumerate(ips):
            for r in range(g * n_cand, (g + 1) * n_cand):
                spans = _split_spans(out[r].tolist(), len(ip.runs))
                doc = ip.splice(spans)
                src = doc.index(SRC_ID) + 1
                codes = self.space.ids_to_codes(doc[src : src + self.space.image_len])
                all_codes_out.append(codes.reshape(self.space.image_grid))
        codes_arr = np.stack(all_codes_out)
        images = self.decode_codes(codes_arr)
        # outside the mask the request's pixels are kept exactly, not their VQ round trip
        for g, job in enumerate(group):
            for r in range(g * n_cand, (g + 1) * n_cand):
                images[r][~job.mask] = job.image[~job.mask]
        scores = self.clip_scores([texts[i] for i in members for _ in range(n_cand)], images)
        for g, (i, job) in enumerate(zip(members, group, strict=True)):
            rows = sorted(range(g * n_cand, (g + 1) * n_cand), key=lambda r: -scores[r])
            results[i] = [GeneratedImage(images[r], float(scores[r]), codes_arr[r])
                          for r in rows[: job.n]]

    def _self_caption(self, job: InfillJob, codes: np.ndarray) -> str:
        """Infilling without a prompt: caption the image first, greedily, and keep it."""
        prompt = self._caption_prompt(self.context_ids(job.neighbours), codes)
        params = SamplingParams(temperature=0.0, max_new_tokens=MAX_CAPTION_TOKENS + 1)
        c = [SpanConstraint(self.space, [InfillSpan("text")],
                            vocab_size=self.decoder.config.vocab_size)]
        out = self._generate([prompt], params, None, c)
        ids = [int(t) for t in out[0] if self.space.is_text(int(t))]
        return self.tokenizer.decode(self.space.ids_to_text(ids))

    def classify(self, jobs: list[ClassifyJob]) -> list[ClassifyResult]:
        results = []
        for job in jobs:
            if _gone(job):  # nobody reads it
                results.append(ClassifyResult("", {}))
                continue
            codes = self.encode_images([job.image, *[e.image for e in job.examples]])
            examples: list[int] = []
            for e, c in zip(job.examples, codes[1:], strict=True):
                examples += self._classify_example(e.caption, c)
            conts = [[*self.space.text_to_ids(self.tokenizer.encode(lbl)), EOS_ID]
                     for lbl in job.labels]
            main = self._caption_prompt([], codes[0])
            # the neighbours only where they fit beside the examples, image and labels
            reserve = len(examples) + len(main) + max(len(c) for c in conts)
            prompt = [*self.context_ids(job.neighbours, reserve), *examples, *main]
            ll = np.asarray(self.log_likelihood([prompt] * len(conts), conts))
            probs = np.exp(ll - ll.max())
            probs /= probs.sum()
            best = int(np.argmax(probs))
            results.append(ClassifyResult(job.labels[best],
                                          {lbl: float(p) for lbl, p in zip(job.labels, probs,
                                                                           strict=True)}))
        return results


def _stoppable(job: Any) -> bool:
    return getattr(job, "stop", None) is not None or getattr(job, "progress", None) is not None


def _gone(job: Any) -> bool:
    """Nobody wants the job's result any more (its client went away, or it timed out)."""
    stop = getattr(job, "stop", None)
    if stop is not None and stop.is_set():
        return True
    progress = getattr(job, "progress", None)
    return progress is not None and bool(progress.cancelled)


def _wanted(group: Sequence[Any]) -> list[int]:
    """Positions in `group` of the jobs still wanted."""
    return [g for g, job in enumerate(group) if not _gone(job)]


def _rows(positions: Sequence[int], per_job: int) -> list[int]:
    return [g * per_job + j for g in positions for j in range(per_job)]


def _new_tokens(ip: Any) -> int:
    # each run's codes, and the sentinel that follows it (or <eos> after the last)
    return sum(ip.run_lengths) + len(ip.runs)


def _fit_sampling(job: Any) -> None:
    """Sampling values the engine can represent. `SamplingParams` refuses values out of
    its ranges when it is made; what a range check lets through is NaN and infinity."""
    s = job.sampling
    for name in ("temperature", "guidance_scale"):
        if not math.isfinite(getattr(s, name)):
            raise Unfit(f"{name} must be a finite number >= 0", param=name)
    if s.seed is not None and not 0 <= s.seed < 2**63:
        raise Unfit("seed must be in [0, 2**63)", param="seed")
    if job.n < 1 or job.num_candidates < job.n:
        raise Unfit("need 1 <= n <= num_candidates", param="num_candidates")


def _guidance_weight(job: Any) -> float:
    w = getattr(job, "retrieval_guidance", None)
    return guidance.DEFAULT_WEIGHT if w is None else float(w)


def _mix(seed: int, j: int) -> int:
    return int(np.random.SeedSequence([seed, j]).generate_state(1, np.uint64)[0] >> 1)


def _runs_capped(positions: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs of masked positions, merged so there are at most 16 sentinels.

    Merging two runs regenerates the codes between them too; that only happens for masks
    with more than 16 separate pieces, where a few extra regenerated codes are the price.
    """
    runs: list[list[int]] = []
    for p in sorted(int(x) for x in positions):
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    while len(runs) > MAX_MASK_RUNS:
        gaps = [runs[i + 1][0] - runs[i][1] for i in range(len(runs) - 1)]
        i = int(np.argmin(gaps))
        runs[i][1] = runs[i + 1][1]
        del runs[i + 1]
    if not runs:
        raise ValueError("the mask covers no image code: nothing to infill")
    return [(s, e) for s, e in runs]


def _split_spans(tokens: Sequence[int], n_spans: int) -> list[list[int]]:
    """Generated `span0 <mask:1> span1 … <eos>` → the n spans."""
    spans: list[list[int]] = [[]]
    for t in tokens:
        if t in (EOS_ID, PAD_ID):
            break
        if len(spans) < n_spans and t == mask_id(len(spans)):
            spans.append([])
        else:
            spans[-1].append(t)
    return spans

