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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, field_validator

from app.images import ImageLimits, b64, decode_base64, decode_mask, decode_rgb_b64, png_b64
from model.jobs import (
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

MAX_SEED = 2**63 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)

def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Numbers in public bodies are strict: `false` is not 0, `true` is not 1, "1" is not 1.
# As JSON Schema has it, a number field takes an integer (`"temperature": 1`) and an
# integer field a number with no fraction (`"n": 2.0`).
# (Bounds of an optional integer go inside its type, before the validator: given on the
# field, pydantic would write them into the JSON Schema as `ge`/`le`, which it ignores.)
Number = Annotated[float, Strict()]
Integer = Annotated[int, Strict(), BeforeValidator(_integral)]
PositiveInteger = Annotated[int, Field(ge=1), Strict(), BeforeValidator(_integral)]
NonNegativeInteger = Annotated[int, Field(ge=0), Strict(), BeforeValidator(_integral)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), Strict(), BeforeValidator(_integral)]

_LIMIT_KEY = "x-racm3-limit"


def limit(setting: str) -> dict[str, str]:
    """Marks a field as bounded by a gateway setting (see `apply_limits`). The gateway
    enforces the bound with its own message; the schema says what it is."""
    return {_LIMIT_KEY: setting}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# --- public: shared pieces ---------------------------------------------------------------


RetrievalModeName = Literal["dense", "hybrid"]
_MODE_DESCRIPTION = (
    "dense: CLIP similarity alone (the paper's retrieval); hybrid: CLIP fused with word "
    "matches against the captions (BM25) for a text query, which finds names CLIP never "
    "learned, and with the stored images' VQ codes for an image query, which finds images "
    "CLIP never learned; None: the server's default (GET /v1/info: "
    "memory.default_retrieval_mode)"
)


class RetrievalOptions(_Strict):
    enabled: bool = True
    k: NonNegativeInteger | None = Field(
        None, description="documents in context; None: server default",
        json_schema_extra=limit("max_k"),
    )
    mode: RetrievalModeName | None = Field(None, description=_MODE_DESCRIPTION)
    memory: str | None = Field(None, description="a named memory; None: the key's default")


class Neighbour(BaseModel):
    id: int
    score: float = Field(description="CLIP similarity to the query, in either mode")
    caption: str | None = None
    thumbnail: str | None = Field(None, description="base64 PNG of the stored image")
    lexical_score: float | None = Field(
        None, description="BM25 of the caption for the query's words (text queries)")
    name_match: bool | None = Field(
        None, description="the caption holds every rare word (a name) of the query")


class ExampleIn(_Strict):
    """A user-given document: base64 image plus its caption."""

    image: str
    caption: str = Field(min_length=1, json_schema_extra=limit("max_prompt_chars"))


class SamplingFields(_Strict):
    """Decoding extensions shared by the generation endpoints (TGI-style, kept apart)."""

    seed: Seed | None = Field(None, description="None: drawn, and returned")
    temperature: Number = Field(1.0, ge=0, le=10, description="0 = greedy")
    top_k: PositiveInteger | None = None
    top_p: Number | None = Field(None, gt=0, le=1)
    num_candidates: PositiveInteger | None = Field(
        None, description="sample this many and rerank; at least n. None: n (no rerank)",
        json_schema_extra=limit("max_candidates"),
    )
    retrieval: RetrievalOptions = Field(default_factory=RetrievalOptions)
    return_neighbours: bool = False
    examples: list[ExampleIn] = Field(
        default_factory=list,
        description="demonstrations: documents in context before the retrieved ones",
    )


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


def _refuse_url(value: Any) -> Any:
    if value == "url":
        raise ValueError(
            "response_format 'url' is not supported: this server never hosts files; "
            "use 'b64_json'"
        )
    return value


# OpenAI's field; only base64 answers exist here (the server never hosts files).
ResponseFormat = Annotated[Literal["b64_json"] | None, BeforeValidator(_refuse_url)]


class ImageGenerationRequest(SamplingFields):
    prompt: str = Field(min_length=1, json_schema_extra=limit("max_prompt_chars"))
    n: Integer = Field(1, ge=1, json_schema_extra=limit("max_n"))
    size: str | None = Field(None, description="'auto' or the bundle's native 'WxH'")
    response_format: ResponseFormat = "b64_json"
    guidance_scale: Number = Field(3.0, ge=0, le=30)
    stream: bool | None = Field(False, description="answer text/event-stream (OpenAI's events)")
    partial_images: int | None = Field(
        None, ge=0, le=3, description="partial images to stream while decoding (with stream)"
    )
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
    box: tuple[Integer, Integer, Integer, Integer] | None = Field(
        None, description="x0, y0, x1, y1 in pixels, half-open: the area to regenerate"
    )
    prompt: str | None = Field(None, json_schema_extra=limit("max_prompt_chars"))
    n: Integer = Field(1, ge=1, json_schema_extra=limit("max_n"))
    guidance_scale: Number = Field(1.0, ge=0, le=30)
    response_format: ResponseFormat = "b64_json"


# --- public: captions, classification ------------------------------------------------------


class CaptionRequest(SamplingFields):
    image: str = Field(description="base64 image (or a data: URL)")
    n: Integer = Field(1, ge=1, json_schema_extra=limit("max_n"))
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


Label = Annotated[str, Field(min_length=1, json_schema_extra=limit("max_prompt_chars"))]


class ClassifyRequest(_Strict):
    image: str = Field(description="base64 image (or a data: URL)")
    labels: list[Label] = Field(
        min_length=1, json_schema_extra={**limit("max_labels"), "uniqueItems": True}
    )
    examples: list[ExampleIn] = Field(
        default_factory=list, json_schema_extra=limit("max_examples")
    )
    retrieval: RetrievalOptions = Field(default_factory=RetrievalOptions)
    return_neighbours: bool = False


class ClassifyResponse(BaseModel):
    label: str
    scores: dict[str, float]
    neighbours: list[Neighbour] | None = None
    memory_version: str | None = None


# --- public: retrieval ---------------------------------------------------------------------


class RetrieveRequest(_Strict):
    text: str | None = Field(None, json_schema_extra=limit("max_prompt_chars"))
    image: str | None = None
    k: Integer = Field(4, ge=1, json_schema_extra=limit("max_knn_results"))
    strategy: Literal["rag", "knn"] = Field(
        "rag", description="rag: the paper's rules (modality, diversity); knn: plain top-k"
    )
    mode: RetrievalModeName | None = Field(None, description=_MODE_DESCRIPTION)
    return_thumbnails: bool = True
    memory: str | None = Field(None, description="a named memory; None: the key's default")


class RetrieveResponse(BaseModel):
    memory_version: str
    data: list[Neighbour]
    memory: str | None = None


# float32 is what the index holds: a larger value would become infinite.
EmbeddingValue = Annotated[float, Strict(), Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]


class KnnServiceRequest(_Lenient):
    """clip-retrieval `ClipClient` request. Safety, aesthetic and mclip options are accepted
    and ignored (no such models here); `image_url` is refused (we never fetch URLs)."""

    text: str | None = Field(None, json_schema_extra=limit("max_prompt_chars"))
    image: str | None = None
    image_url: str | None = None
    embedding_input: list[EmbeddingValue] | None = Field(
        None, description="a query embedding, as many values as the memory's dimension"
    )
    modality: Literal["image", "text"] = "image"
    num_images: Integer = Field(40, ge=1, json_schema_extra=limit("max_knn_results"))
    num_result_ids: PositiveInteger | None = Field(
        None, json_schema_extra=limit("max_knn_results")
    )
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
    """What the server is and what it accepts. Never where its files are, nor the bundle
    manifest's free-text notes: the info route is public."""

    name: str = "racm3"
    version: str
    role: str
    generator: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    cache: dict[str, Any] | None = None
    limits: dict[str, Any] = Field(default_factory=dict)
    memories: dict[str, dict[str, Any]] | None = Field(
        None, description="the memories this key may use: state, version, documents")

    @field_validator("memory")
    @classmethod
    def _no_path(cls, memory: dict[str, Any] | None) -> dict[str, Any] | None:
        if memory is None:
            return None
        return {k: v for k, v in memory.items() if k != "path"}

    @field_validator("generator")
    @classmethod
    def _no_notes(cls, generator: dict[str, Any] | None) -> dict[str, Any] | None:
        if generator is None or not isinstance(generator.get("manifest"), dict):
            return generator
        manifest = {
            k: v for k, v in generator["manifest"].items()
            if not (k == "notes" or k.endswith("_note") or k.endswith("_notes"))
        }
        return {**generator, "manifest": manifest}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = Field(description="the request field at fault, dotted, if any")
    code: str | None = Field(description="a stable, machine-readable reason")


class ErrorResponse(BaseModel):
    """Every error answer has this shape."""

    error: ErrorDetail


def _error(description: str, **extra: Any) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description, **extra}


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}

UNAUTHORIZED = {401: _error("missing or invalid API key (when API keys are configured)")}
INVALID = {422: _error("invalid input: a field, its type or a limit; `param` names the field")}
# What every inference route can answer besides 200, for the OpenAPI document.
INFERENCE_ERRORS: dict[int | str, dict[str, Any]] = {
    **UNAUTHORIZED,
    404: _error("the named memory does not exist, or the API key may not use it"),
    413: _error("the body or an image is too large"),
    **INVALID,
    429: _error("the server is busy: retry after `Retry-After` seconds", headers=_RETRY_AFTER),
    503: _error("a dependency (memory, generator, retriever) is not available",
                headers=_RETRY_AFTER),
    504: _error("the request took longer than the server's timeout"),
}
RELOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    **UNAUTHORIZED,
    404: _error("the named memory does not exist, or the API key may not use it"),
    409: _error("the published version was refused; the previous one keeps serving"),
    503: _error("the retriever is not available", headers=_RETRY_AFTER),
}

DOCUMENTS_ERRORS: dict[int | str, dict[str, Any]] = {
    **RELOAD_ERRORS,
    413: _error("the body or an image is too large"),
    **INVALID,
}


def apply_limits(openapi: dict[str, Any], limits: Mapping[str, int]) -> dict[str, Any]:
    """Write the configured limits into an OpenAPI document, in place: each schema marked
    with `limit(setting)` gets the setting's value as its `maximum`, `maxLength` or
    `maxItems`, whichever its type takes."""

    def bound(schema: dict[str, Any], value: int) -> None:
        branches = [b for b in schema.get("anyOf", [schema]) if b.get("type") != "null"]
        for branch in branches:
            keyword = {"integer": "maximum", "number": "maximum", "string": "maxLength",
                       "array": "maxItems"}.get(branch.get("type", ""))
            if keyword is not None:
                branch[keyword] = value

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            setting = node.pop(_LIMIT_KEY, None)
            if setting is not None and setting in limits:
                bound(node, int(limits[setting]))
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(openapi)
    return openapi


def finish_openapi(openapi: dict[str, Any], limits: Mapping[str, int]) -> dict[str, Any]:
    """The document FastAPI generates, made true to the server, in place: invalid input is
    `ErrorResponse` (FastAPI assumes its own `{"detail": [...]}`), and the configured
    limits are written in (`apply_limits`)."""
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(error_schema.pop("$defs", {}))
    components["ErrorResponse"] = error_schema
    fastapi_422 = "#/components/schemas/HTTPValidationError"
    for operation in _operations(openapi):
        invalid = operation.get("responses", {}).get("422")
        content = (invalid or {}).get("content", {}).get("application/json", {})
        if content.get("schema", {}).get("$ref") == fastapi_422:
            invalid["description"] = INVALID[422]["description"]
            content["schema"] = {"$ref": "#/components/schemas/ErrorResponse"}
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    return apply_limits(openapi, limits)


def _operations(openapi: dict[str, Any]) -> list[dict[str, Any]]:
    return [op for item in openapi.get("paths", {}).values() for op in item.values()
            if isinstance(op, dict)]


class ReloadResponse(BaseModel):
    memory_version: str
    previous_version: str | None  # None: no version was served (the start-up had failed)
    changed: bool
    documents: int
    memory: str | None = None


class DocumentsResponse(BaseModel):
    memory_version: str = Field(description="the new version, now being served")
    previous_version: str
    documents: int = Field(description="documents in the new version")
    added: int
    ids: list[int] = Field(description="the new documents' ids, in the order they were sent")


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
    memory: str | None = None


class NeighbourWire(BaseModel):
    id: int
    score: float
    caption: str | None = None
    text_ids: list[int] | None = None
    image_codes: list[list[int]] | None = None
    thumbnail: str | None = None
    lexical_score: float | None = None
    name_match: bool | None = None
    # base64 of the little-endian float32 CLIP vector of the image's VQ reconstruction
    # (NeighbourDoc.image_vector): a third of a JSON list's size
    image_vector: str | None = None

    @field_validator("image_vector")
    @classmethod
    def _vector(cls, v: str | None) -> str | None:
        if v is not None:
            _vector_from_wire(v)
        return v

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
            image_vector=None if doc.image_vector is None else b64(
                np.ascontiguousarray(doc.image_vector, dtype="<f4").tobytes()),
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
            image_vector=None if self.image_vector is None else _vector_from_wire(
                self.image_vector),
        )


def _vector_from_wire(text: str) -> np.ndarray:
    """A wire image vector as float32 (D,); ValueError unless finite float32 values."""
    raw = decode_base64(text, "image_vector", 1 << 20)
    if not raw or len(raw) % 4:
        raise ValueError("image_vector must be base64 of float32 values")
    vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.isfinite(vector).all():
        raise ValueError("image_vector holds non-finite values")
    return vector


class SearchResponse(BaseModel):
    memory_version: str
    results: list[list[NeighbourWire]]
    memory: str | None = None


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
        # no filter travels as null, as the client's request said it
        return cls(seed=p.seed, temperature=p.temperature, top_k=p.top_k or None,
                   top_p=None if p.top_p == 1.0 else p.top_p, guidance_scale=p.guidance_scale)

    def to_params(self) -> SamplingParams:
        return SamplingParams(**self.model_dump())


class ExampleWire(_Strict):
    image: str
    caption: str


class _JobWire(_Strict):
    neighbours: list[NeighbourWire] = Field(default_factory=list)
    n: int = Field(1, ge=1)
    num_candidates: int = Field(1, ge=1)
    sampling: SamplingWire
    examples: list[ExampleWire] = Field(default_factory=list)

    @staticmethod
    def _shared_from(job: T2IJob | CaptionJob | InfillJob) -> dict[str, Any]:
        """The fields every generation job has, as wire values."""
        return {"neighbours": [NeighbourWire.from_doc(d) for d in job.neighbours],
                "n": job.n, "num_candidates": job.num_candidates,
                "sampling": SamplingWire.from_params(job.sampling),
                "examples": _examples_to_wire(job.examples)}

    def _shared(self) -> dict[str, Any]:
        """The fields every generation job has, as the engine takes them."""
        return {"neighbours": [d.to_doc() for d in self.neighbours], "n": self.n,
                "num_candidates": self.num_candidates, "sampling": self.sampling.to_params(),
                "examples": _examples_from_wire(self.examples)}


def _rgb(data: str, param: str) -> np.ndarray:
    return decode_rgb_b64(data, param, INTERNAL_IMAGE_LIMITS)


def _examples_to_wire(examples: list[FewShotExample]) -> list[ExampleWire]:
    return [ExampleWire(image=png_b64(e.image), caption=e.caption) for e in examples]


def _examples_from_wire(examples: list[ExampleWire]) -> list[FewShotExample]:
    return [
        FewShotExample(image=_rgb(e.image, f"examples.{i}.image"), caption=e.caption)
        for i, e in enumerate(examples)
    ]


class T2IJobWire(_JobWire):
    prompt: str
    retrieval_guidance: float | None = Field(None, ge=0, le=1)

    @classmethod
    def from_job(cls, job: T2IJob) -> T2IJobWire:
        return cls(prompt=job.prompt, retrieval_guidance=job.retrieval_guidance,
                   **cls._shared_from(job))

    def to_job(self) -> T2IJob:
        return T2IJob(prompt=self.prompt, retrieval_guidance=self.retrieval_guidance,
                      **self._shared())


class CaptionJobWire(_JobWire):
    image: str
    retrieval_guidance: float | None = Field(None, ge=0, le=1)

    @classmethod
    def from_job(cls, job: CaptionJob) -> CaptionJobWire:
        return cls(image=png_b64(job.image), retrieval_guidance=job.retrieval_guidance,
                   **cls._shared_from(job))

    def to_job(self) -> CaptionJob:
        return CaptionJob(image=_rgb(self.image, "image"),
                          retrieval_guidance=self.retrieval_guidance, **self._shared())


class InfillJobWire(_JobWire):
    image: str
    mask: str = Field(description="base64 PNG, mode L: 255 = regenerate")
    prompt: str | None = None

    @classmethod
    def from_job(cls, job: InfillJob) -> InfillJobWire:
        return cls(image=png_b64(job.image), mask=png_b64(job.mask.astype(np.uint8) * 255),
                   prompt=job.prompt, **cls._shared_from(job))

    def to_job(self) -> InfillJob:
        raw = decode_base64(self.mask, "mask", INTERNAL_IMAGE_LIMITS.max_bytes)
        return InfillJob(image=_rgb(self.image, "image"),
                         mask=decode_mask(raw, "mask", INTERNAL_IMAGE_LIMITS).mask,
                         prompt=self.prompt, **self._shared())


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
            examples=_examples_to_wire(job.examples),
        )

    def to_job(self) -> ClassifyJob:
        return ClassifyJob(
            image=_rgb(self.image, "image"),
            labels=list(self.labels),
            neighbours=[d.to_doc() for d in self.neighbours],
            examples=_examples_from_wire(self.examples),
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

    @classmethod
    def from_result(cls, images: list[GeneratedImage]) -> ImagesResultWire:
        return cls(images=[GeneratedImageWire.from_result(g) for g in images])

    def to_result(self) -> list[GeneratedImage]:
        return [g.to_result() for g in self.images]


class CaptionWire(BaseModel):
    text: str
    logprob: float

    def to_result(self) -> GeneratedCaption:
        return GeneratedCaption(text=self.text, logprob=self.logprob)


class CaptionsResultWire(BaseModel):
    captions: list[CaptionWire]

    @classmethod
    def from_result(cls, captions: list[GeneratedCaption]) -> CaptionsResultWire:
        return cls(captions=[CaptionWire(text=c.text, logprob=c.logprob) for c in captions])

    def to_result(self) -> list[GeneratedCaption]:
        return [c.to_result() for c in self.captions]


class ClassifyResultWire(BaseModel):
    label: str
    scores: dict[str, float]

    @classmethod
    def from_result(cls, result: ClassifyResult) -> ClassifyResultWire:
        return cls(label=result.label, scores=result.scores)

    def to_result(self) -> ClassifyResult:
        return ClassifyResult(label=self.label, scores=dict(self.scores))


# --- internal: streamed generation (the worker's NDJSON lines) -------------------------


class T2IStreamJobWire(T2IJobWire):
    partial_images: int = Field(0, ge=0, le=3)


class InfillStreamJobWire(InfillJobWire):
    partial_images: int = Field(0, ge=0, le=3)


@dataclass(frozen=True)
class TaskWire:
    """How one generator task crosses from the gateway to a worker: the job's body, the
    result's body and, for the tasks that decode images, the streamed job's body. Each
    has `from_job`/`to_job` or `from_result`/`to_result`, so that the worker's routes and
    the HTTP client are written once for every task."""

    job: type[Any]
    result: type[Any]
    stream_job: type[Any] | None = None


GENERATOR_TASKS: dict[str, TaskWire] = {
    "text_to_image": TaskWire(T2IJobWire, ImagesResultWire, T2IStreamJobWire),
    "infill": TaskWire(InfillJobWire, ImagesResultWire, InfillStreamJobWire),
    "caption": TaskWire(CaptionJobWire, CaptionsResultWire),
    "classify": TaskWire(ClassifyJobWire, ClassifyResultWire),
}


class UsageWire(BaseModel):
    text_tokens: int = 0
    image_tokens: int = 0
    output_tokens: int = 0


class StreamEventWire(BaseModel):
    """One line of a worker's stream: a partial image, the result, or the error that
    ended it (with the HTTP status it would have had)."""

    type: Literal["partial_image", "completed", "error"]
    index: int | None = None
    image: str | None = None
    images: list[GeneratedImageWire] | None = None
    usage: UsageWire | None = None
    error: dict[str, Any] | None = None
    status: int | None = None
