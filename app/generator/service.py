"""The generator worker role: the engine behind a dynamic batcher.

Jobs from concurrent requests are batched per task (max batch size, max wait ms) and
run on one engine thread. The queue is bounded (429 beyond it), every job has a timeout
(504), and a job whose client disconnected is dropped before its batch runs.

Images are resized to the engine's native size here, so every engine call sees one
size (see `model.jobs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request

from app.batching import DynamicBatcher
from app.errors import ApiError, NotReady
from app.images import resize_mask, resize_rgb
from app.metrics import Metrics
from app.schemas import (
    CaptionJobWire,
    CaptionsResultWire,
    CaptionWire,
    ClassifyJobWire,
    ClassifyResultWire,
    GeneratedImageWire,
    ImagesResultWire,
    InfillJobWire,
    InfoResponse,
    T2IJobWire,
)
from app.settings import GeneratorSettings
from model.jobs import (
    CaptionJob,
    ClassifyJob,
    ClassifyResult,
    Engine,
    FewShotExample,
    GeneratedCaption,
    GeneratedImage,
    InfillJob,
    T2IJob,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
EngineFactory = Callable[[GeneratorSettings], Engine]


class ClientDisconnected(ApiError):
    """The client went away; nobody reads this response (nginx's 499 convention)."""

    status_code = 499
    error_type = "client_closed_request"
    default_code = "client_disconnected"


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read by now, so the next ASGI message is the disconnect.
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the HTTP client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise ClientDisconnected("client disconnected; job cancelled")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


class GeneratorService:
    def __init__(
        self, settings: GeneratorSettings, engine_factory: EngineFactory, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.engine_factory = engine_factory
        self.metrics = metrics
        self.engine: Engine | None = None
        self.engine_info: dict[str, Any] = {}
        self.state = "loading"
        self.batcher = DynamicBatcher(
            "generate",
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_expected_wait_ms=settings.max_expected_wait_ms,
            max_queue=settings.queue_size,
            metrics=metrics,
        )

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        try:
            self.engine = await asyncio.to_thread(self.engine_factory, self.settings)
            fast_stats = getattr(self.engine, "fast_decode_stats", None)
            if callable(fast_stats):
                self.metrics.watch_prefix_cache(fast_stats)
            with self.metrics.stage("warmup"):
                await asyncio.to_thread(self.engine.warmup)
            self.engine_info = dict(self.engine.info())
            await self.batcher.start()
        except Exception as exc:
            log.exception("generator failed to start")
            self.state = f"failed: {type(exc).__name__}: {exc}"[:300]
            return
        self.state = "ready"
        log.info("generator ready: %s", self.engine_info.get("name", "engine"))

    async def stop(self) -> None:
        await self.batcher.stop()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def checks(self) -> dict[str, str]:
        return {"generator": self.state}

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.engine_info.get("image_size", (32, 32))
        return int(h), int(w)

    def describe(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "max_batch_size": self.settings.max_batch_size,
            "max_wait_ms": self.settings.max_wait_ms,
            "max_expected_wait_ms": self.settings.max_expected_wait_ms,
            "queue_size": self.settings.queue_size,
            "queue_depth": self.batcher.depth,
            **self.engine_info,
        }

    # --- tasks ---------------------------------------------------------------------------

    async def _submit(self, task: str, job: Any) -> Any:
        if not self.ready:
            raise NotReady(f"generator is not ready ({self.state})")
        return await self.batcher.submit(task, job, self.settings.request_timeout_s)

    def _fit_examples(self, examples: Sequence[FewShotExample]) -> None:
        for example in examples:
            example.image = resize_rgb(example.image, self.image_size)

    async def text_to_image(self, job: T2IJob) -> list[GeneratedImage]:
        self._fit_examples(job.examples)
        return await self._submit("text_to_image", job)

    async def caption(self, job: CaptionJob) -> list[GeneratedCaption]:
        job.image = resize_rgb(job.image, self.image_size)
        self._fit_examples(job.examples)
        return await self._submit("caption", job)

    async def infill(self, job: InfillJob) -> list[GeneratedImage]:
        job.image = resize_rgb(job.image, self.image_size)
        job.mask = resize_mask(job.mask, self.image_size)
        self._fit_examples(job.examples)
        return await self._submit("infill", job)

    async def classify(self, job: ClassifyJob) -> ClassifyResult:
        job.image = resize_rgb(job.image, self.image_size)
        self._fit_examples(job.examples)
        return await self._submit("classify", job)

    def _run_batch(self, task: Any, jobs: Sequence[Any]) -> list[Any]:
        """Runs on the batcher's engine thread."""
        assert self.engine is not None
        before = self.engine.tokens_generated
        with self.metrics.stage(f"generate_{task}"):
            results = getattr(self.engine, task)(list(jobs))
        self.metrics.tokens_generated.inc(max(0, self.engine.tokens_generated - before))
        return list(results)


# --- HTTP (the generator role) -----------------------------------------------------------


def _service(request: Request) -> GeneratorService:
    return request.app.state.generator_service


def build_router(require_key: Callable[..., Any]) -> APIRouter:
    """Internal routes of the worker (the gateway's HttpGeneratorClient calls them)."""
    router = APIRouter(dependencies=[Depends(require_key)])

    @router.post("/internal/text_to_image", response_model=ImagesResultWire)
    async def text_to_image(
        body: T2IJobWire, request: Request, svc: GeneratorService = Depends(_service)
    ) -> ImagesResultWire:
        images = await run_until_disconnect(request, svc.text_to_image(body.to_job()))
        return ImagesResultWire(images=[GeneratedImageWire.from_result(g) for g in images])

    @router.post("/internal/caption", response_model=CaptionsResultWire)
    async def caption(
        body: CaptionJobWire, request: Request, svc: GeneratorService = Depends(_service)
    ) -> CaptionsResultWire:
        caps = await run_until_disconnect(request, svc.caption(body.to_job()))
        return CaptionsResultWire(
            captions=[CaptionWire(text=c.text, logprob=c.logprob) for c in caps]
        )

    @router.post("/internal/infill", response_model=ImagesResultWire)
    async def infill(
        body: InfillJobWire, request: Request, svc: GeneratorService = Depends(_service)
    ) -> ImagesResultWire:
        images = await run_until_disconnect(request, svc.infill(body.to_job()))
        return ImagesResultWire(images=[GeneratedImageWire.from_result(g) for g in images])

    @router.post("/internal/classify", response_model=ClassifyResultWire)
    async def classify(
        body: ClassifyJobWire, request: Request, svc: GeneratorService = Depends(_service)
    ) -> ClassifyResultWire:
        result = await run_until_disconnect(request, svc.classify(body.to_job()))
        return ClassifyResultWire(label=result.label, scores=result.scores)

    return router


def build_info_router() -> APIRouter:
    router = APIRouter()

    @router.get("/v1/info", response_model=InfoResponse, response_model_exclude_none=True)
    async def info(request: Request, svc: GeneratorService = Depends(_service)) -> InfoResponse:
        return InfoResponse(version=request.app.version, role="generator", generator=svc.describe())

    return router
