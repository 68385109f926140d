"""The generator worker role: the engine behind a dynamic batcher.

Jobs from concurrent requests are batched per task (max batch size, max wait ms) and
run on one engine thread. A job the engine cannot take (`Engine.fit`: a prompt that does
not fit the decoder's window, say) is refused with a 422 before it joins a batch. The
queue is bounded (429 beyond it), every job has a timeout (504), and a job whose client
disconnected is dropped before its batch runs, or, running, leaves its batch at the next
decoding step (its stop flag, `model.jobs`).

Images are resized to the engine's native size here, so every engine call sees one
size (see `model.jobs`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from app.batching import DynamicBatcher
from app.disconnect import run_until_disconnect
from app.errors import InvalidRequest, NotReady
from app.images import resize_mask, resize_rgb
from app.metrics import Metrics
from app.schemas import GENERATOR_TASKS, InfoResponse, TaskWire
from app.settings import GeneratorSettings
from app.streaming import ClosingStreamingResponse, ndjson_events, open_local_stream
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
    Unfit,
)

log = logging.getLogger(__name__)

EngineFactory = Callable[[GeneratorSettings], Engine]


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
            on_cancel=_stop_job,
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
        self.fit(task, job)
        job.stop = threading.Event()  # set by the batcher if nobody wants the result
        return await self.batcher.submit(task, job, self.settings.request_timeout_s)

    def fit(self, task: str, job: Any) -> None:
        """The engine's `fit`: a job it cannot take is a 422 of its own, before it joins
        a batch."""
        assert self.engine is not None
        fit = getattr(self.engine, "fit", None)
        if fit is None:
            return
        try:
            fit(task, job)
        except Unfit as exc:
            raise InvalidRequest(str(exc), param=exc.param, code=exc.code) from None

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

    async def generate(self, task: str, job: Any) -> Any:
        """The job of `task`, one of `GENERATOR_TASKS`, fitted and run by its method above."""
        if task not in GENERATOR_TASKS:
            raise ValueError(f"unknown generator task {task!r}")
        return await getattr(self, task)(job)

    def _run_batch(self, task: Any, jobs: Sequence[Any]) -> list[Any]:
        """Runs on the batcher's engine thread."""
        assert self.engine is not None
        before = self.engine.tokens_generated
        with self.metrics.stage(f"generate_{task}"):
            try:
                results = getattr(self.engine, task)(list(jobs))
            except Unfit as exc:  # `fit` should have caught it; still the client's error
                raise InvalidRequest(str(exc), param=exc.param, code=exc.code) from None
        self.metrics.tokens_generated.inc(max(0, self.engine.tokens_generated - before))
        return list(results)


def _stop_job(job: Any) -> None:
    stop = getattr(job, "stop", None)
    if stop is not None:
        stop.set()


# --- HTTP (the generator role) -----------------------------------------------------------


def _service(request: Request) -> GeneratorService:
    return request.app.state.generator_service


def build_router(require_key: Callable[..., Any]) -> APIRouter:
    """Internal routes of the worker, one per task and one streamed per image task (the
    gateway's HttpGeneratorClient calls them)."""
    router = APIRouter(dependencies=[Depends(require_key)])
    for task, wire in GENERATOR_TASKS.items():
        router.add_api_route(f"/internal/{task}", _job_route(task, wire), methods=["POST"],
                             response_model=wire.result)
    for task, wire in GENERATOR_TASKS.items():
        if wire.stream_job is not None:
            router.add_api_route(f"/internal/{task}/stream", _stream_route(task, wire.stream_job),
                                 methods=["POST"], response_model=None)
    return router


def _job_route(task: str, wire: TaskWire) -> Callable[..., Awaitable[Any]]:
    async def run_job(
        body: Any, request: Request, svc: GeneratorService = Depends(_service)
    ) -> Any:
        result = await run_until_disconnect(request, svc.generate(task, body.to_job()))
        return wire.result.from_result(result)

    return _with_body_type(run_job, wire.job)


def _stream_route(task: str, stream_job: type[Any]) -> Callable[..., Awaitable[Any]]:
    async def stream_job_events(
        body: Any, svc: GeneratorService = Depends(_service)
    ) -> StreamingResponse:
        stream = await open_local_stream(partial(svc.generate, task), body.to_job(),
                                         body.partial_images)
        return ClosingStreamingResponse(ndjson_events(stream), stream,
                                        media_type="application/x-ndjson")

    return _with_body_type(stream_job_events, stream_job)


def _with_body_type(route: Callable[..., Awaitable[Any]], body_type: type[Any]
                    ) -> Callable[..., Awaitable[Any]]:
    """FastAPI reads a route's body model from its signature: each task's route is the same
    function with its own wire model put there."""
    signature = inspect.signature(route)
    route.__signature__ = signature.replace(parameters=[  # type: ignore[attr-defined]
        p.replace(annotation=body_type) if p.name == "body" else p
        for p in signature.parameters.values()
    ])
    return route


def build_info_router() -> APIRouter:
    router = APIRouter()

    @router.get("/v1/info", response_model=InfoResponse, response_model_exclude_none=True)
    async def info(request: Request, svc: GeneratorService = Depends(_service)) -> InfoResponse:
        return InfoResponse(version=request.app.version, role="generator", generator=svc.describe())

    return router
