"""The public API: validate, authenticate, bound the load, orchestrate
(docs/architecture.md, "The request path").

Every request is validated completely before any model sees it (TGI's rule): pydantic
for shapes, then the configured limits here. A route ends by describing its request as a
`Plan`, and `orchestrate` runs every plan the same way: retrieve neighbours (retriever
client) -> build the job -> generate (generator client) -> respond. Both clients are
interfaces, so the same routes serve embedded mode (in-process) and multi-service mode
(HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import math
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.batching import Ticket
from app.clients import GeneratorClient, RetrieverClient
from app.disconnect import run_until_disconnect
from app.errors import InvalidRequest, QueueFull, RequestTimeout, Unauthorized
from app.images import (
    DecodedImage,
    DecodedMask,
    ImageLimits,
    b64,
    box_mask,
    decode_base64,
    decode_image,
    decode_mask,
    in_decode_thread,
    png_b64,
)
from app.memories import DEFAULT_MEMORY, MemoryAccess, parse_api_key
from app.metrics import Metrics
from app.retriever.service import RetrievalQuery
from app.schemas import (
    FLOAT32_MAX,
    INFERENCE_ERRORS,
    RELOAD_ERRORS,
    CaptionObject,
    CaptionRequest,
    CaptionResponse,
    ClassifyRequest,
    ClassifyResponse,
    ExampleIn,
    HealthResponse,
    ImageGenerationRequest,
    ImageObject,
    ImagesResponse,
    InfillRequest,
    InfoResponse,
    KnnResult,
    KnnServiceRequest,
    Neighbour,
    ReadyResponse,
    ReloadResponse,
    ResponseFormat,
    RetrievalModeName,
    RetrievalOptions,
    RetrieveRequest,
    RetrieveResponse,
    limit,
)
from app.settings import GatewaySettings
from app.streaming import (
    IMAGE_EDIT,
    IMAGE_GENERATION,
    GenerationStream,
    StreamContext,
    neighbours_event,
    stream_images,
)
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
from model.sampling import draw_seed

T = TypeVar("T")
# The configured limits `/v1/info` shows (with `Gateway.limits`' window-derived ones).
PUBLIC_LIMITS = {
    "max_body_bytes", "max_image_bytes", "max_image_pixels", "max_image_side",
    "max_prompt_chars", "max_n", "max_candidates", "max_labels", "max_examples", "max_k",
    "max_knn_results", "request_timeout_s",
}


# --- authentication ----------------------------------------------------------------------


def api_key_checker(keys: list[str]) -> Callable[..., None]:
    """A dependency enforcing `Authorization: Bearer <key>` when keys are configured (and
    then declaring the HTTP bearer scheme in the OpenAPI document). It leaves the key's
    memories (None: all) in `request.state.allowed_memories`."""
    entries = [parse_api_key(k) for k in keys]
    digests = [(hashlib.sha256(e.key.encode()).digest(), e.memories) for e in entries]
    if not digests:
        def no_key(request: Request) -> None:
            request.state.allowed_memories = None

        return no_key
    bearer = HTTPBearer(auto_error=False, description="one of the server's API keys")

    def require_api_key(
        request: Request, _: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> None:
        request.state.allowed_memories = None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing API key: send Authorization: Bearer <key>")
        given = hashlib.sha256(token.strip().encode()).digest()
        matched = [memories for d, memories in digests if hmac.compare_digest(given, d)]
        if not matched:
            raise Unauthorized("invalid API key")
        request.state.allowed_memories = matched[0]

    return require_api_key


# --- the gateway's resources -------------------------------------------------------------


@dataclass
class Gateway:
    settings: GatewaySettings
    retriever: RetrieverClient
    generator: GeneratorClient
    metrics: Metrics
    role: str = "gateway"
    inflight: int = 0
    # Admission and anticipation: a generation job is announced before its neighbours are
    # retrieved, and the announcement refuses (429, `QueueFull`) when the generator has no
    # room for it, so a refused request costs no retrieval. Embedded mode: the generator's
    # `batcher.expecting`, whose queue then also waits for the announced job (see
    # app/batching.py); multi-service mode: the HTTP client's, which counts the jobs in
    # flight against the workers' capacity (app/clients.py).
    announce: Callable[[str], AbstractContextManager[Ticket]] | None = None
    # The configured memory names (app/memories.py): which one a request may use is
    # decided here, from configuration alone, before anything is retrieved.
    access: MemoryAccess = field(default_factory=lambda: MemoryAccess([DEFAULT_MEMORY]))
    _generator_info: dict[str, Any] = field(default_factory=dict)

    @property
    def image_limits(self) -> ImageLimits:
        s = self.settings
        return ImageLimits(s.max_image_bytes, s.max_image_pixels, s.max_image_side)

    async def generator_info(self) -> dict[str, Any]:
        if "image_size" not in self._generator_info:
            info = await self.generator.info()
            if "image_size" in info:
                self._generator_info = info
            return info
        return self._generator_info

    async def image_size(self) -> tuple[int, int]:
        h, w = (await self.generator_info()).get("image_size", (32, 32))
        return int(h), int(w)

    def window(self) -> dict[str, int]:
        """What fits the decoder's window (`Engine.window`), once the generator said."""
        return dict(self._generator_info.get("window") or {})

    def limits(self) -> dict[str, Any]:
        """The limits a request meets: the configured ones, with `max_k` lowered to what
        the decoder's window can hold, and the window's prompt limits (in tokens)."""
        limits: dict[str, Any] = self.settings.model_dump(include=PUBLIC_LIMITS)
        window = self.window()
        if "max_k" in window:
            limits["max_k"] = min(limits["max_k"], int(window["max_k"]))
        for key in ("max_prompt_tokens", "max_edit_prompt_tokens"):
            if key in window:
                limits[key] = int(window[key])
        return limits

    async def run(self, request: Request, work: Awaitable[T]) -> T:
        """Bound concurrency, enforce the timeout, cancel when the client goes away."""
        if self.inflight >= self.settings.max_inflight:
            if hasattr(work, "close"):
                work.close()  # never started: avoid "coroutine was never awaited"
            raise QueueFull(
                f"gateway busy ({self.inflight} requests in flight); retry later",
                retry_after_s=self.settings.retry_after_s,
            )
        self.inflight += 1
        try:
            with self.metrics.stage("request"):
                return await _with_timeout(
                    run_until_disconnect(request, work), self.settings.request_timeout_s
                )
        finally:
            self.inflight -= 1

    async def generate(
        self, request: Request, task: str, work: Callable[[Ticket], Awaitable[T]]
    ) -> T:
        """`run` for a request that will submit one `task` job to the generator: in embedded
        mode the generator hears of the job now, while its neighbours are retrieved, until
        `work` calls `ticket.arrived()` right before submitting; its batcher then waits for
        that job instead of blindly (app/batching.py)."""
        with self.expecting(task) as ticket:
            return await self.run(request, work(ticket))

    def expecting(self, task: str) -> AbstractContextManager[Ticket]:
        if self.announce is None:
            return contextlib.nullcontext(_NoTicket())
        return self.announce(task)

    def memory_for(self, request: Request, requested: str | None, param: str) -> str:
        """The memory this request uses; a forbidden one is 404 exactly as an unknown one."""
        allowed = getattr(request.state, "allowed_memories", None)
        return self.access.resolve(requested, allowed, param)

    async def neighbours(
        self,
        query: RetrievalQuery,
        options: RetrievalOptions,
        *,
        thumbnails: bool,
        memory: str | None = None,
        examples: int = 0,
    ) -> tuple[list[NeighbourDoc], str | None]:
        if not options.enabled:
            return [], None
        k = await self.retrieval_k(options, examples)
        with self.metrics.stage("retrieve"):
            out = await self.retriever.search(
                [query], k, "rag", mode=options.mode, tokens=True, thumbnails=thumbnails,
                memory=memory,
            )
        return out.neighbours[0], out.memory_version

    async def retrieval_k(self, options: RetrievalOptions, examples: int = 0,
                          param: str = "retrieval.k") -> int:
        """Documents to retrieve. By default demonstrations take the place of retrieved
        documents: the decoder was trained with at most `default_k` documents in context,
        and with more it follows neither (racm3 eval --tasks examples). An explicit
        `retrieval.k` is honoured up to `max_k`: the configured limit, or fewer where the
        decoder's window cannot hold that many documents."""
        await self.generator_info()  # the window, asked once
        most = self.limits()["max_k"]
        k = min(max(0, self.settings.default_k - examples), most) if options.k is None \
            else options.k
        if k > most:
            why = ("" if most == self.settings.max_k else
                   f" (the decoder's window of {self.window().get('tokens')} tokens holds "
                   f"at most {most} retrieved documents beside a prompt)")
            raise InvalidRequest(f"{param} must be <= {most}{why}", param=param)
        return k


async def _with_timeout(work: Awaitable[T], timeout_s: float) -> T:
    try:
        return await asyncio.wait_for(work, timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"request took longer than {timeout_s:g} s") from None


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(_gateway)]


# --- validation helpers ------------------------------------------------------------------


def _check_prompt(
    gw: Gateway, prompt: str | None, param: str = "prompt", required: bool = True
) -> str | None:
    if prompt is None or not prompt.strip():
        if required:
            raise InvalidRequest(f"{param} must not be empty", param=param)
        return None
    if len(prompt) > gw.settings.max_prompt_chars:
        raise InvalidRequest(
            f"{param} is {len(prompt)} characters; the limit is {gw.settings.max_prompt_chars}",
            param=param,
            code="prompt_too_long",
        )
    if "\x00" in prompt:
        raise InvalidRequest(f"{param} contains a NUL character", param=param)
    return prompt


def _check_counts(gw: Gateway, n: int, num_candidates: int | None) -> int:
    if n > gw.settings.max_n:
        raise InvalidRequest(f"n must be between 1 and {gw.settings.max_n}", param="n")
    candidates = n if num_candidates is None else num_candidates
    if candidates < n:
        raise InvalidRequest("num_candidates must be >= n", param="num_candidates")
    if candidates > gw.settings.max_candidates:
        raise InvalidRequest(
            f"num_candidates must be <= {gw.settings.max_candidates}", param="num_candidates"
        )
    return candidates


async def _check_size(gw: Gateway, size: str | None) -> None:
    if size is None or size == "auto":
        return
    h, w = await gw.image_size()
    if size != f"{w}x{h}":
        raise InvalidRequest(
            f"this model generates {w}x{h} images; size must be '{w}x{h}' or 'auto'",
            param="size",
            code="unsupported_size",
        )


def _unit_embedding(values: list[float]) -> np.ndarray:
    """The query embedding as a float32 unit vector. Scaled by its largest value first, so
    that squaring large values cannot overflow; all zeros has no direction."""
    vector = np.asarray(values, dtype=np.float64)
    largest = float(np.max(np.abs(vector)))
    if not np.isfinite(largest) or largest > FLOAT32_MAX:
        raise InvalidRequest(
            f"embedding_input values must be finite and within +-{FLOAT32_MAX:.4g}",
            param="embedding_input",
        )
    if largest == 0.0:
        raise InvalidRequest("embedding_input must not be all zeros", param="embedding_input")
    vector /= largest
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def _seed(seed: int | None) -> int:
    return draw_seed() if seed is None else seed


def _sampling(body: Any, seed: int, guidance_scale: float = 1.0) -> SamplingParams:
    return SamplingParams(
        seed=seed,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        guidance_scale=guidance_scale,
    )


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else 0.0


def _public_neighbours(docs: list[NeighbourDoc], include: bool) -> list[Neighbour] | None:
    if not include:
        return None
    return [
        Neighbour(
            id=d.id,
            score=_finite(d.score),
            caption=d.caption,
            thumbnail=None if d.thumbnail_png is None else b64(d.thumbnail_png),
            lexical_score=None if d.lexical_score is None else _finite(d.lexical_score),
            name_match=d.name_match,
        )
        for d in docs
    ]


def _images_response(
    images: list[GeneratedImage],
    seed: int,
    docs: list[NeighbourDoc],
    include_neighbours: bool,
    version: str | None,
) -> ImagesResponse:
    return ImagesResponse(
        created=int(time.time()),
        data=[ImageObject(b64_json=png_b64(g.image), score=_finite(g.score)) for g in images],
        seed=seed,
        neighbours=_public_neighbours(docs, include_neighbours),
        memory_version=version if include_neighbours else None,
    )


async def _decode_image(gw: Gateway, data: str, param: str) -> np.ndarray:
    return (await _decode_full(gw, data, param)).rgb


async def _decode_full(gw: Gateway, data: str, param: str) -> DecodedImage:
    raw = decode_base64(data, param, gw.settings.max_image_bytes)
    return await in_decode_thread(decode_image, raw, param, gw.image_limits)


async def _decode_mask(gw: Gateway, data: str, param: str) -> DecodedMask:
    raw = decode_base64(data, param, gw.settings.max_image_bytes)
    return await in_decode_thread(decode_mask, raw, param, gw.image_limits)


async def _read_upload(gw: Gateway, upload: UploadFile, param: str) -> bytes:
    data = await upload.read(gw.settings.max_image_bytes + 1)
    if not data:
        raise InvalidRequest(f"{param} is empty", param=param, code="invalid_image")
    return data


async def _decode_examples(gw: Gateway, examples: list[ExampleIn]) -> list[FewShotExample]:
    """Demonstrations, checked as /v1/images/classify checks its examples."""
    if len(examples) > gw.settings.max_examples:
        raise InvalidRequest(f"at most {gw.settings.max_examples} examples", param="examples")
    return [
        FewShotExample(
            image=await _decode_image(gw, e.image, f"examples.{i}.image"),
            caption=_check_prompt(gw, e.caption, param=f"examples.{i}.caption"),
        )
        for i, e in enumerate(examples)
    ]


async def _size_text(gw: Gateway) -> str:
    h, w = await gw.image_size()
    return f"{w}x{h}"


def _neighbours_event(
    docs: list[NeighbourDoc], version: str | None, seed: int, include: bool
) -> bytes | None:
    if not include:
        return None
    return neighbours_event(_public_neighbours(docs, True) or [], version, seed)


def _region(image: DecodedImage, mask: DecodedMask | None, param: str) -> np.ndarray:
    """The area to regenerate, at the image's working size: the mask's (which must be the
    image's size, as sent), or without one the image's own transparent area."""
    if mask is not None and mask.size != image.size:
        w, h = image.size
        mw, mh = mask.size
        raise InvalidRequest(
            f"mask is {mw}x{mh} but the image is {w}x{h}; they must be the same size",
            param=param,
            code="mask_size_mismatch",
        )
    region = image.transparent if mask is None else mask.mask
    if region is None or not region.any():
        raise InvalidRequest(
            "mask marks nothing to regenerate (use alpha 0, or white without alpha)",
            param=param,
            code="empty_mask",
        )
    return region


def _box_region(image: DecodedImage, box: tuple[int, int, int, int], param: str) -> np.ndarray:
    """A box in the image's pixels as sent, as a mask at its working size: every working
    pixel that the box touches."""
    w, h = image.size
    box_mask(box, h, w, param)  # validates against the size as sent
    s = image.scale
    x0, y0, x1, y1 = box
    height, width = image.rgb.shape[:2]
    scaled = (x0 // s, y0 // s, min(width, -(-x1 // s)), min(height, -(-y1 // s)))
    return box_mask(scaled, height, width, param)


# --- the one orchestration ---------------------------------------------------------------


@dataclass
class Streamed:
    """A streamed answer: OpenAI's event names and fields, and how many partial images."""

    context: StreamContext
    partial_images: int


@dataclass
class Plan:
    """A validated inference request: what to retrieve, the generator job to build from the
    neighbours, and the answer to make of its result. `orchestrate` runs every plan."""

    task: str  # a generator task (app/schemas.py's GENERATOR_TASKS)
    query: RetrievalQuery
    retrieval: RetrievalOptions
    memory: str
    return_neighbours: bool
    make_job: Callable[[list[NeighbourDoc]], Any]
    respond: Callable[[Any, list[NeighbourDoc], str | None], Any]
    stream: Streamed | None = None
    # demonstrations in the context take the place of retrieved documents by default
    examples: int = 0


async def orchestrate(gw: Gateway, request: Request, plan: Plan) -> Any:
    """retrieve -> build the job -> generate -> respond, the same for every task; as
    server-sent events when the plan streams."""

    async def neighbours_and_job(ticket: Ticket) -> tuple[Any, list[NeighbourDoc], str | None]:
        docs, version = await gw.neighbours(
            plan.query, plan.retrieval, thumbnails=plan.return_neighbours, memory=plan.memory,
            examples=plan.examples,
        )
        job = plan.make_job(docs)
        ticket.arrived()  # submitted next: no longer on its way
        return job, docs, version

    if plan.stream is not None:
        streamed = plan.stream

        async def open_stream(ticket: Ticket) -> tuple[GenerationStream, bytes | None]:
            job, docs, version = await neighbours_and_job(ticket)
            opened = await gw.generator.stream(plan.task, job, streamed.partial_images)
            intro = _neighbours_event(docs, version, streamed.context.seed,
                                      plan.return_neighbours)
            return opened, intro

        return await stream_images(gw, request, plan.task, streamed.context, open_stream,
                                   _finite)

    async def work(ticket: Ticket) -> Any:
        job, docs, version = await neighbours_and_job(ticket)
        with gw.metrics.stage("generate"):
            result = await gw.generator.generate(plan.task, job)
        return plan.respond(result, docs, version)

    return await gw.generate(request, plan.task, work)


def _respond_with_images(
    seed: int, include_neighbours: bool
) -> Callable[[list[GeneratedImage], list[NeighbourDoc], str | None], ImagesResponse]:
    def respond(
        images: list[GeneratedImage], docs: list[NeighbourDoc], version: str | None
    ) -> ImagesResponse:
        return _images_response(images, seed, docs, include_neighbours, version)

    return respond


# --- routes: validation, then a plan -------------------------------------------------------


async def generations(
    body: ImageGenerationRequest, request: Request, gw: GatewayDep
) -> ImagesResponse:
    prompt = _check_prompt(gw, body.prompt)
    candidates = _check_counts(gw, body.n, body.num_candidates)
    await _check_size(gw, body.size)
    await gw.retrieval_k(body.retrieval)
    memory = gw.memory_for(request, body.retrieval.memory, "retrieval.memory")
    examples = await _decode_examples(gw, body.examples)
    seed = _seed(body.seed)
    sampling = _sampling(body, seed, body.guidance_scale)
    streamed = None
    if body.stream:
        context = StreamContext(IMAGE_GENERATION, await _size_text(gw), seed)
        streamed = Streamed(context, body.partial_images or 0)
    return await orchestrate(gw, request, Plan(
        "text_to_image", RetrievalQuery(text=prompt), body.retrieval, memory,
        body.return_neighbours,
        examples=len(examples),
        make_job=lambda docs: T2IJob(prompt, docs, body.n, candidates, sampling, examples,
                                     retrieval_guidance=body.retrieval_guidance),
        respond=_respond_with_images(seed, body.return_neighbours),
        stream=streamed,
    ))


async def edits(
    request: Request,
    gw: GatewayDep,
    prompt: Annotated[str, Form(json_schema_extra=limit("max_prompt_chars"))],
    image: Annotated[UploadFile | None, File(description="the image to edit")] = None,
    image_list: Annotated[list[UploadFile] | None, File(alias="image[]")] = None,
    mask: Annotated[UploadFile | None, File(description="alpha 0 = area to change")] = None,
    n: Annotated[int, Form(ge=1, json_schema_extra=limit("max_n"))] = 1,
    size: Annotated[str | None, Form()] = None,
    response_format: Annotated[ResponseFormat, Form()] = "b64_json",
    seed: Annotated[int | None, Form(ge=0, le=2**63 - 1)] = None,
    temperature: Annotated[float, Form(ge=0, le=10, allow_inf_nan=False)] = 1.0,
    top_k: Annotated[int | None, Form(ge=1)] = None,
    top_p: Annotated[float | None, Form(gt=0, le=1, allow_inf_nan=False)] = None,
    guidance_scale: Annotated[float, Form(ge=0, le=30, allow_inf_nan=False)] = 3.0,
    num_candidates: Annotated[
        int | None, Form(ge=1, json_schema_extra=limit("max_candidates"))
    ] = None,
    retrieval_k: Annotated[int | None, Form(ge=0, json_schema_extra=limit("max_k"))] = None,
    retrieval_mode: Annotated[RetrievalModeName | None, Form()] = None,
    retrieval_memory: Annotated[str | None, Form()] = None,
    return_neighbours: Annotated[bool, Form()] = False,
    stream: Annotated[bool | None, Form()] = False,
    partial_images: Annotated[int | None, Form(ge=0, le=3)] = None,
) -> ImagesResponse:
    uploads = [u for u in ([image] if image is not None else []) + (image_list or [])]
    if not uploads:
        raise InvalidRequest("image is required (multipart file field 'image')", param="image")
    if len(uploads) > 1:
        raise InvalidRequest("exactly one image can be edited", param="image")
    _check_prompt(gw, prompt)
    candidates = _check_counts(gw, n, num_candidates)
    await _check_size(gw, size)
    rgb, region = await _edit_region(gw, uploads[0], mask)
    sampling = _sampling(_FormSampling(temperature, top_k, top_p), _seed(seed), guidance_scale)
    options = RetrievalOptions(k=retrieval_k, mode=retrieval_mode)
    await gw.retrieval_k(options, param="retrieval_k")
    memory = gw.memory_for(request, retrieval_memory, "retrieval_memory")
    streamed = None
    if stream:
        context = StreamContext(IMAGE_EDIT, f"{rgb.shape[1]}x{rgb.shape[0]}", sampling.seed)
        streamed = Streamed(context, partial_images or 0)
    return await orchestrate(gw, request, Plan(
        "infill", RetrievalQuery(text=prompt), options, memory, return_neighbours,
        make_job=lambda docs: InfillJob(rgb, region, prompt, docs, n, candidates, sampling),
        respond=_respond_with_images(sampling.seed, return_neighbours),
        stream=streamed,
    ))


async def _edit_region(
    gw: Gateway, upload: UploadFile, mask: UploadFile | None
) -> tuple[np.ndarray, np.ndarray]:
    """The uploaded image at its working size, and the area to change: the mask's, or
    without one the image's own transparent area."""
    raw = await _read_upload(gw, upload, "image")
    source = await in_decode_thread(decode_image, raw, "image", gw.image_limits)
    if mask is not None:
        raw_mask = await _read_upload(gw, mask, "mask")
        mask_img = await in_decode_thread(decode_mask, raw_mask, "mask", gw.image_limits)
        return source.rgb, _region(source, mask_img, "mask")
    if source.transparent is not None and source.transparent.any():
        return source.rgb, _region(source, None, "image")
    raise InvalidRequest(
        "provide a mask, or an image whose transparent area (alpha 0) marks the edit",
        param="mask",
    )


async def infill(body: InfillRequest, request: Request, gw: GatewayDep) -> ImagesResponse:
    prompt = _check_prompt(gw, body.prompt, required=False)
    candidates = _check_counts(gw, body.n, body.num_candidates)
    if (body.mask is None) == (body.box is None):
        raise InvalidRequest("give exactly one of mask or box", param="mask")
    source = await _decode_full(gw, body.image, "image")
    rgb = source.rgb
    if body.mask is not None:
        region = _region(source, await _decode_mask(gw, body.mask, "mask"), "mask")
    else:
        assert body.box is not None
        region = _box_region(source, body.box, "box")
    await gw.retrieval_k(body.retrieval)
    memory = gw.memory_for(request, body.retrieval.memory, "retrieval.memory")
    examples = await _decode_examples(gw, body.examples)
    seed = _seed(body.seed)
    sampling = _sampling(body, seed, body.guidance_scale)
    # Without a prompt the image itself finds its neighbours.
    query = RetrievalQuery(text=prompt) if prompt else RetrievalQuery(image=rgb)
    return await orchestrate(gw, request, Plan(
        "infill", query, body.retrieval, memory, body.return_neighbours,
        examples=len(examples),
        make_job=lambda docs: InfillJob(rgb, region, prompt, docs, body.n, candidates,
                                        sampling, examples),
        respond=_respond_with_images(seed, body.return_neighbours),
    ))


async def captions(body: CaptionRequest, request: Request, gw: GatewayDep) -> CaptionResponse:
    candidates = _check_counts(gw, body.n, body.num_candidates)
    rgb = await _decode_image(gw, body.image, "image")
    await gw.retrieval_k(body.retrieval)
    memory = gw.memory_for(request, body.retrieval.memory, "retrieval.memory")
    examples = await _decode_examples(gw, body.examples)
    seed = _seed(body.seed)

    def respond(
        caps: list[GeneratedCaption], docs: list[NeighbourDoc], version: str | None
    ) -> CaptionResponse:
        return CaptionResponse(
            created=int(time.time()),
            data=[CaptionObject(text=c.text, score=_finite(c.logprob)) for c in caps],
            seed=seed,
            neighbours=_public_neighbours(docs, body.return_neighbours),
            memory_version=version if body.return_neighbours else None,
        )

    return await orchestrate(gw, request, Plan(
        "caption", RetrievalQuery(image=rgb), body.retrieval, memory, body.return_neighbours,
        examples=len(examples),
        make_job=lambda docs: CaptionJob(rgb, docs, body.n, candidates, _sampling(body, seed),
                                         examples, retrieval_guidance=body.retrieval_guidance),
        respond=respond,
    ))


async def classify(body: ClassifyRequest, request: Request, gw: GatewayDep) -> ClassifyResponse:
    s = gw.settings
    if len(body.labels) > s.max_labels:
        raise InvalidRequest(f"at most {s.max_labels} labels", param="labels")
    for i, label in enumerate(body.labels):
        _check_prompt(gw, label, param=f"labels.{i}")
    if len(set(body.labels)) != len(body.labels):
        raise InvalidRequest("labels must be distinct", param="labels")
    rgb = await _decode_image(gw, body.image, "image")
    examples = await _decode_examples(gw, body.examples)
    await gw.retrieval_k(body.retrieval)
    memory = gw.memory_for(request, body.retrieval.memory, "retrieval.memory")

    def respond(
        result: ClassifyResult, docs: list[NeighbourDoc], version: str | None
    ) -> ClassifyResponse:
        return ClassifyResponse(
            label=result.label,
            scores={k: _finite(v) for k, v in result.scores.items()},
            neighbours=_public_neighbours(docs, body.return_neighbours),
            memory_version=version if body.return_neighbours else None,
        )

    return await orchestrate(gw, request, Plan(
        "classify", RetrievalQuery(image=rgb), body.retrieval, memory, body.return_neighbours,
        make_job=lambda docs: ClassifyJob(rgb, list(body.labels), docs, examples),
        respond=respond,
    ))


# Retrieval alone: no generator job, so no plan.


async def retrieve(body: RetrieveRequest, request: Request, gw: GatewayDep) -> RetrieveResponse:
    if body.text is None and body.image is None:
        raise InvalidRequest("give text, image or both", param="text")
    text = _check_prompt(gw, body.text, param="text") if body.text is not None else None
    if body.k > gw.settings.max_knn_results:
        raise InvalidRequest(f"k must be <= {gw.settings.max_knn_results}", param="k")
    memory = gw.memory_for(request, body.memory, "memory")
    image = None if body.image is None else await _decode_image(gw, body.image, "image")
    query = RetrievalQuery(text=text, image=image)

    async def work() -> RetrieveResponse:
        with gw.metrics.stage("retrieve"):
            out = await gw.retriever.search(
                [query], body.k, body.strategy, mode=body.mode, tokens=False,
                thumbnails=body.return_thumbnails, memory=memory,
            )
        neighbours = _public_neighbours(out.neighbours[0], True) or []
        return RetrieveResponse(memory_version=out.memory_version, data=neighbours,
                                memory=memory)

    return await gw.run(request, work())


async def knn_service(
    body: KnnServiceRequest, request: Request, gw: GatewayDep
) -> list[KnnResult]:
    if body.image_url:
        raise InvalidRequest(
            "image_url is not supported: this server never fetches URLs; send the image "
            "as base64 in 'image'",
            param="image_url",
        )
    given = [x for x in (body.text, body.image, body.embedding_input) if x]
    if len(given) != 1:
        raise InvalidRequest(
            "give exactly one of text, image or embedding_input", param="text"
        )
    # With one unnamed memory `indice_name` is ignored, so that clip-retrieval's
    # ClipClient keeps working with its default index name; named memories check it.
    named = gw.settings.memories is not None
    memory = gw.memory_for(request, body.indice_name if named else None, "indice_name")
    most = gw.settings.max_knn_results
    for param, value in (("num_images", body.num_images),
                         ("num_result_ids", body.num_result_ids)):
        if value is not None and value > most:
            raise InvalidRequest(f"{param} must be <= {most}", param=param)
    text = _check_prompt(gw, body.text, param="text") if body.text else None
    image = await _decode_image(gw, body.image, "image") if body.image else None
    embedding = None
    if body.embedding_input:
        embedding = _unit_embedding(body.embedding_input)
    query = RetrievalQuery(text=text, image=image, embedding=embedding)

    async def work() -> list[KnnResult]:
        with gw.metrics.stage("retrieve"):
            # clip-retrieval's contract is CLIP similarity order: dense unless asked
            out = await gw.retriever.search(
                [query], body.num_images, "knn", mode=body.mode or "dense", tokens=False,
                thumbnails=True, memory=memory,
            )
        return _knn_results(out.neighbours[0], body.deduplicate)

    return await gw.run(request, work())


def _knn_results(docs: list[NeighbourDoc], deduplicate: bool) -> list[KnnResult]:
    """clip-retrieval's result rows; with `deduplicate`, one per distinct thumbnail."""
    results: list[KnnResult] = []
    seen: set[bytes] = set()
    for d in docs:
        if deduplicate and d.thumbnail_png is not None:
            digest = hashlib.sha256(d.thumbnail_png).digest()
            if digest in seen:
                continue
            seen.add(digest)
        results.append(
            KnnResult(
                id=d.id,
                similarity=_finite(d.score),
                caption=d.caption,
                image=None if d.thumbnail_png is None else b64(d.thumbnail_png),
            )
        )
    return results


def build_router(require_key: Callable[..., Any]) -> APIRouter:
    """The inference routes (API-key protected when keys are configured)."""
    router = APIRouter(dependencies=[Depends(require_key)], responses=INFERENCE_ERRORS)
    for path, route, model in (
        ("/v1/images/generations", generations, ImagesResponse),
        ("/v1/images/edits", edits, ImagesResponse),
        ("/v1/images/infill", infill, ImagesResponse),
        ("/v1/images/captions", captions, CaptionResponse),
        ("/v1/images/classify", classify, ClassifyResponse),
        ("/v1/retrieve", retrieve, RetrieveResponse),
    ):
        router.add_api_route(path, route, methods=["POST"], response_model=model,
                             response_model_exclude_none=True)
    # clip-retrieval's ClipClient posts JSON without a Content-Type header.
    knn_router = APIRouter(strict_content_type=False)
    knn_router.add_api_route("/knn-service", knn_service, methods=["POST"],
                             response_model=list[KnnResult], response_model_exclude_none=True)
    router.include_router(knn_router)
    return router


def build_admin_router(require_key: Callable[..., Any]) -> APIRouter:
    router = APIRouter(dependencies=[Depends(require_key)], responses=RELOAD_ERRORS)

    @router.post("/admin/reload", response_model=ReloadResponse,
                 response_model_exclude_none=True)
    async def reload(request: Request, gw: GatewayDep, memory: str | None = None
                     ) -> ReloadResponse:
        return await gw.retriever.reload(gw.memory_for(request, memory, "memory"))

    return router


def build_ops_router(require_key: Callable[[Request], None]) -> APIRouter:
    """Info: no API key needed, but with keys configured it shows a caller only the
    memories its key may use (none without a valid key)."""
    router = APIRouter()

    @router.get("/v1/info", response_model=InfoResponse, response_model_exclude_none=True)
    async def info(request: Request, gw: GatewayDep) -> InfoResponse:
        try:
            require_key(request)
            allowed = request.state.allowed_memories
        except Unauthorized:
            allowed = frozenset()
        retriever = await gw.retriever.info()
        memory, memories = _visible_memories(gw, retriever.get("memory"), allowed)
        generator = await gw.generator_info()
        return InfoResponse(
            version=request.app.version,
            role=gw.role,
            generator=generator,
            memory=memory,
            cache=retriever.get("cache"),
            limits=gw.limits(),
            memories=memories,
        )

    return router


def _visible_memories(
    gw: Gateway, described: dict[str, Any] | None, allowed: frozenset[str] | None
) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """(the caller's default memory in full, {name: summary} of the memories it may use)."""
    described = dict(described or {})
    every = described.pop("memories", None) or {}
    names = gw.access.visible(allowed)
    memories = {n: every.get(n, {"state": "unknown"}) for n in names}
    if not names:
        return None, memories
    if described.get("name", names[0]) == names[0]:
        return described, memories
    return {"name": names[0], **memories[names[0]]}, memories


def build_health_router(readiness: Callable[[], Awaitable[ReadyResponse]]) -> APIRouter:
    """/healthz, /readyz and /metrics, shared by every role."""
    router = APIRouter()

    @router.get("/healthz", response_model=HealthResponse)
    async def healthz() -> HealthResponse:
        return HealthResponse()

    @router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
    async def readyz(response: Response) -> ReadyResponse:
        ready = await readiness()
        if ready.status == "not_ready":
            response.status_code = 503
        return ready

    @router.get("/metrics", response_class=PlainTextResponse, response_model=None)
    async def metrics(request: Request) -> Response:
        body, content_type = request.app.state.metrics.render()
        return Response(body, media_type=content_type)

    return router


class _NoTicket(Ticket):
    """Multi-service mode: the worker is behind HTTP, and nothing is announced to it."""

    def __init__(self) -> None:
        pass

    def arrived(self) -> None:
        return None


@dataclass
class _FormSampling:
    temperature: float
    top_k: int | None
    top_p: float | None
