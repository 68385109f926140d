"""The wire contract: every request and response body, public and internal, in one module.

Public shapes follow what users already know: the OpenAI Images API for generations and
edits (`ImagesResponse`), clip-retrieval's `/knn-service`. Our own endpoints reject
unknown fields, so a misspelt parameter is an error rather than silently ignored; the
compatibility shapes accept the other fields their clients send and ignore them.

The internal section is what the gateway sends the retriever (`/internal/search`) and
the generator workers (`/internal/*`). Images travel as base64 PNG (lossless), VQ codes
and token ids as integer lists. Conversions to and from the engine's dataclasses live
beside each internal model.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from app.generator.protocol import (
    CaptionJob,
    ClassifyJob,
    ClassifyResult,
    FewShotExample,
    GeneratedCaption,
    GeneratedImage,
    InfillJob,
    NeighbourDoc,
    SamplingParams,
    T2IJob,
)
from app.images import ImageLimits, b64, decode_base64, decode_rgb_b64, open_image, png_b64

MAX_SEED = 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# --- public: shared pieces ---------------------------------------------------------------


RetrievalModeName = Literal["dense", "hybrid"]
_MODE_DESCRIPTION = (
    "dense: CLIP similarity alone (the paper's retrieval); hybrid: CLIP fused with word "
    "matches against the captions (BM25), which finds names CLIP never learned; "
    "None: the server's default (GET /v1/info: memory.default_retrieval_mode)"
)


class RetrievalOptions(_Strict):
    enabled: bool = True
    k: int | None = Field(None, ge=0, description="documents in context; None: server default")
    mode: RetrievalModeName | None = Field(None, description=_MODE_DESCRIPTION)


class Neighbour(BaseModel):
    id: int
    score: float = Field(description="CLIP similarity to the query, in either mode")
    caption: str | None = None
    thumbnail: str | None = Field(None, description="base64 PNG of the stored image")
    lexical_score: float | None = Field(
        None, description="BM25 of the caption for the query's words (text queries)")
    name_match: bool | None = Field(
        None, description="the caption holds every rare word (a name) of the query")


class SamplingFields(_Strict):
    """Decoding extensions shared by the generation endpoints (TGI-style, kept apart)."""

    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="None: drawn, and returned")
    temperature: float = Field(1.0, ge=0, le=10, description="0 = greedy")
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    num_candidates: int | None = Field(
        None, ge=1, description="sample this many and rerank; None: n (no rerank)"
    )
    retrieval: RetrievalOptions = Field(default_factory=RetrievalOptions)
    return_neighbours: bool = False


RETRIEVAL_GUIDANCE_DESCRIPTION = (
    "retrieval-guided decoding: how strongly what the relevant neighbours hold (their image "
    "codes; for captions, the names in neighbours whose image matches) is mixed into "
    "sampling, 0..1; 0 is the paper's decoding; None: the server's default, reported by "
    "GET /v1/info under generator.retrieval_guidance")


def _retrieval_guidance() -> Any:
    return Field(None, ge=0, le=1, description=RETRIEVAL_GUIDANCE_DESCRIPTION)


class ImageObject(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    score: float | None = Field(
        None, description="CLIP score of the image against the prompt. Images come best first "
        "by the engine's ranking: this score plus, with retrieval, their agreement with the "
        "retrieved images, so with neighbours the scores need not descend")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageObject]
    seed: int
    neighbours: list[Neighbour] | None = None
    memory_version: str | None = None


# --- public: generation, edits, infill -----------------------------------------------------


class ImageGenerationRequest(SamplingFields):
    prompt: str = Field(min_length=1)
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="'auto' or the bundle's native 'WxH'")
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    guidance_scale: float = Field(3.0, ge=0, le=30)
    retrieval_guidance: float | None = _retrieval_guidance()
    # Accepted for OpenAI-client compatibility; this server has one model and one style.
    model: str | None = None
    quality: str | None = None
    style: str | None = None
    output_format: Literal["png"] | None = None
    user: str | None = None


class InfillRequest(SamplingFields):
    image: str = Field(description="base64 image (or a data: URL)")
    mask: str | None = Field(
        None,
        description="base64 image, same size: alpha 0 (or, without alpha, white) = regenerate",
    )
    box: tuple[int, int, int, int] | None = Field(
        None, description="x0, y0, x1, y1 in pixels, half-open: the area to regenerate"
    )
    prompt: str | None = None
    n: int = Field(1, ge=1)
    guidance_scale: float = Field(1.0, ge=0, le=30)
    response_format: Literal["b64_json", "url"] | None = "b64_json"


# --- public: captions, classification ------------------------------------------------------


class CaptionRequest(SamplingFields):
    image: str = Field(description="base64 image (or a data: URL)")
    n: int = Field(1, ge=1)
    retrieval_guidance: float | None = _retrieval_guidance()


class CaptionObject(BaseModel):
    text: str
    score: float = Field(description="log-likelihood of the caption under the model")


class CaptionResponse(BaseModel):
    created: int
    data: list[CaptionObject]
    seed: int
    neighbours: list[Neighbour] | None = None
    memory_version: str | None = None


class ExampleIn(_Strict):
    image: str
    caption: str = Field(min_length=1)


class ClassifyRequest(_Strict):
    image: str = Field(description="base64 image (or a data: URL)")
    labels: list[str] = Field(min_length=1)
    examples: list[ExampleIn] = Field(default_factory=list)
    retrieval: RetrievalOptions = Field(default_factory=RetrievalOptions)
    return_neighbours: bool = False


class ClassifyResponse(BaseModel):
    label: str
    scores: dict[str, float]
    neighbours: list[Neighbour] | None = None
    memory_version: str | None = None


# --- public: retrieval ---------------------------------------------------------------------


class RetrieveRequest(_Strict):
    text: str | None = None
    image: str | None = None
    k: int = Field(4, ge=1)
    strategy: Literal["rag", "knn"] = Field(
        "rag", description="rag: the paper's rules (modality, diversity); knn: plain top-k"
    )
    mode: RetrievalModeName | None = Field(None, description=_MODE_DESCRIPTION)
    return_thumbnails: bool = True


class RetrieveResponse(BaseModel):
    memory_version: str
    data: list[Neighbour]


class KnnServiceRequest(_Lenient):
    """clip-retrieval `ClipClient` request. Safety, aesthetic and mclip options are accepted
    and ignored (no such models here); `image_url` is refused (we never fetch URLs)."""

    text: str | None = None
    image: str | None = None
    image_url: str | None = None
    embedding_input: list[float] | None = None
    modality: Literal["image", "text"] = "image"
    num_images: int = Field(40, ge=1)
    num_result_ids: int | None = Field(None, ge=1)
    indice_name: str | None = None
    use_mclip: bool = False
    deduplicate: bool = True
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: int | str | None = None
    aesthetic_weight: float | str | None = None
    # Our extension; clip-retrieval clients never send it, and get CLIP similarity order.
    mode: RetrievalModeName | None = Field(
        None, description="dense (None: clip-retrieval's order by CLIP similarity) or hybrid")


class KnnResult(BaseModel):
    id: int
    similarity: float
    caption: str | None = None
    image: str | None = Field(None, description="base64 of the stored image")
    url: str | None = None


# --- public: operations --------------------------------------------------------------------


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready", "degraded", "not_ready"]
    checks: dict[str, str]


class InfoResponse(BaseModel):
    name: str = "racm3"
    version: str
    role: str
    generator: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    cache: dict[str, Any] | None = None
    limits: dict[str, Any] = Field(default_factory=dict)


class ReloadResponse(BaseModel):
    memory_version: str
    previous_version: str
    changed: bool
    documents: int


# --- internal: retriever -------------------------------------------------------------------


class QueryWire(_Strict):
    text: str | None = None
    image: str | None = Field(None, description="base64 PNG")
    embedding: list[float] | None = None


class SearchRequest(_Strict):
    queries: list[QueryWire] = Field(min_length=1)
    k: int = Field(ge=0, le=1000)
    strategy: Literal["rag", "knn"] = "rag"
    mode: RetrievalModeName | None = None  # None: the retriever's default
    tokens: bool = True
    thumbnails: bool = False


class NeighbourWire(BaseModel):
    id: int
    score: float
    caption: str | None = None
    text_ids: list[int] | None = None
    image_codes: list[list[int]] | None = None
    thumbnail: str | None = None
    lexical_score: float | None = None
    name_match: bool | None = None

    @classmethod
    def from_doc(cls, doc: NeighbourDoc) -> NeighbourWire:
        return cls(
            id=doc.id,
            score=doc.score,
            caption=doc.caption,
            text_ids=None if doc.text_ids is None else [int(t) for t in doc.text_ids],
            image_codes=None if doc.image_codes is None else np.asarray(doc.image_codes).tolist(),
            thumbnail=None if doc.thumbnail_png is None else b64(doc.thumbnail_png),
            lexical_score=doc.lexical_score,
            name_match=doc.name_match,
        )

    def to_doc(self) -> NeighbourDoc:
        return NeighbourDoc(
            id=self.id,
            score=self.score,
            caption=self.caption,
            text_ids=self.text_ids,
            image_codes=None if self.image_codes is None else np.asarray(self.image_codes),
            thumbnail_png=None if self.thumbnail is None else decode_base64(
                self.thumbnail, "thumbnail", 1 << 30
            ),
            lexical_score=self.lexical_score,
            name_match=self.name_match,
        )


class SearchResponse(BaseModel):
    memory_version: str
    results: list[list[NeighbourWire]]


# --- internal: generator -------------------------------------------------------------------

# Internal images were validated by the gateway; the worker still bounds what it decodes.
INTERNAL_IMAGE_LIMITS = ImageLimits(max_bytes=64 * 1024 * 1024, max_pixels=1 << 26, max_side=8192)


class SamplingWire(_Strict):
    seed: int = Field(ge=0, le=MAX_SEED)
    temperature: float = Field(1.0, ge=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    guidance_scale: float = Field(1.0, ge=0)

    @classmethod
    def from_params(cls, p: SamplingParams) -> SamplingWire:
        return cls(**p.__dict__)

    def to_params(self) -> SamplingParams:
        return SamplingParams(**self.model_dump())


class _JobWire(_Strict):
    neighbours: list[NeighbourWire] = Field(default_factory=list)
    n: int = Field(1, ge=1)
    num_candidates: int = Field(1, ge=1)
    sampling: SamplingWire


def _rgb(data: str, param: str) -> np.ndarray:
    return decode_rgb_b64(data, param, INTERNAL_IMAGE_LIMITS)


class T2IJobWire(_JobWire):
    prompt: str
    retrieval_guidance: float | None = Field(None, ge=0, le=1)

    @classmethod
    def from_job(cls, job: T2IJob) -> T2IJobWire:
        return cls(
            prompt=job.prompt,
            neighbours=[NeighbourWire.from_doc(d) for d in job.neighbours],
            n=job.n,
            num_candidates=job.num_candidates,
            sampling=SamplingWire.from_params(job.sampling),
            retrieval_guidance=job.retrieval_guidance,
        )

    def to_job(self) -> T2IJob:
        return T2IJob(
            prompt=self.prompt,
            neighbours=[d.to_doc() for d in self.neighbours],
            n=self.n,
            num_candidates=self.num_candidates,
            sampling=self.sampling.to_params(),
            retrieval_guidance=self.retrieval_guidance,
        )


class CaptionJobWire(_JobWire):
    image: str
    retrieval_guidance: float | None = Field(None, ge=0, le=1)

    @classmethod
    def from_job(cls, job: CaptionJob) -> CaptionJobWire:
        return cls(
            image=png_b64(job.image),
            neighbours=[NeighbourWire.from_doc(d) for d in job.neighbours],
            n=job.n,
            num_candidates=job.num_candidates,
            sampling=SamplingWire.from_params(job.sampling),
            retrieval_guidance=job.retrieval_guidance,
        )

    def to_job(self) -> CaptionJob:
        return CaptionJob(
            image=_rgb(self.image, "image"),
            neighbours=[d.to_doc() for d in self.neighbours],
            n=self.n,
            num_candidates=self.num_candidates,
            sampling=self.sampling.to_params(),
            retrieval_guidance=self.retrieval_guidance,
        )


class InfillJobWire(_JobWire):
    image: str
    mask: str = Field(description="base64 PNG, mode L: 255 = regenerate")
    prompt: str | None = None

    @classmethod
    def from_job(cls, job: InfillJob) -> InfillJobWire:
        return cls(
            image=png_b64(job.image),
            mask=png_b64(job.mask.astype(np.uint8) * 255),
            prompt=job.prompt,
            neighbours=[NeighbourWire.from_doc(d) for d in job.neighbours],
            n=job.n,
            num_candidates=job.num_candidates,
            sampling=SamplingWire.from_params(job.sampling),
        )

    def to_job(self) -> InfillJob:
        raw = decode_base64(self.mask, "mask", INTERNAL_IMAGE_LIMITS.max_bytes)
        mask_img = open_image(raw, "mask", INTERNAL_IMAGE_LIMITS)
        return InfillJob(
            image=_rgb(self.image, "image"),
            mask=np.asarray(mask_img.convert("L")) > 127,
            prompt=self.prompt,
            neighbours=[d.to_doc() for d in self.neighbours],
            n=self.n,
            num_candidates=self.num_candidates,
            sampling=self.sampling.to_params(),
        )


class ExampleWire(_Strict):
    image: str
    caption: str


class ClassifyJobWire(_Strict):
    image: str
    labels: list[str] = Field(min_length=1)
    neighbours: list[NeighbourWire] = Field(default_factory=list)
    examples: list[ExampleWire] = Field(default_factory=list)

    @classmethod
    def from_job(cls, job: ClassifyJob) -> ClassifyJobWire:
        return cls(
            image=png_b64(job.image),
            labels=list(job.labels),
            neighbours=[NeighbourWire.from_doc(d) for d in job.neighbours],
            examples=[ExampleWire(image=png_b64(e.image), caption=e.caption) for e in job.examples],
        )

    def to_job(self) -> ClassifyJob:
        return ClassifyJob(
            image=_rgb(self.image, "image"),
            labels=list(self.labels),
            neighbours=[d.to_doc() for d in self.neighbours],
            examples=[
                FewShotExample(image=_rgb(e.image, f"examples.{i}.image"), caption=e.caption)
                for i, e in enumerate(self.examples)
            ],
        )


class GeneratedImageWire(BaseModel):
    image: str
    score: float
    codes: list[list[int]]

    @classmethod
    def from_result(cls, g: GeneratedImage) -> GeneratedImageWire:
        return cls(image=png_b64(g.image), score=float(g.score), codes=np.asarray(g.codes).tolist())

    def to_result(self) -> GeneratedImage:
        return GeneratedImage(
            image=_rgb(self.image, "image"), score=self.score, codes=np.asarray(self.codes)
        )


class ImagesResultWire(BaseModel):
    images: list[GeneratedImageWire]


class CaptionWire(BaseModel):
    text: str
    logprob: float

    def to_result(self) -> GeneratedCaption:
        return GeneratedCaption(text=self.text, logprob=self.logprob)


class CaptionsResultWire(BaseModel):
    captions: list[CaptionWire]


class ClassifyResultWire(BaseModel):
    label: str
    scores: dict[str, float]

    def to_result(self) -> ClassifyResult:
        return ClassifyResult(label=self.label, scores=dict(self.scores))
