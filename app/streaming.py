"""Streamed generation: partial images while an image decodes, as OpenAI streams them.

Three hops, one event model (`PartialImage`, then `Finished`):

- engine -> worker: the job carries a `StreamSink` (the engine's `Progress`), which the
  engine calls from its thread; `open_local_stream` submits the job to the worker's
  batcher and reads the sink from the event loop.
- worker -> gateway (multi-service mode): `/internal/{task}/stream` answers NDJSON, one
  `StreamEventWire` per line, written as each event happens; `HttpStream` reads it
  line by line, so nothing is buffered on the way. The worker's routes are in
  `app/generator/service.py`, the balancing across workers in `app/clients.py`.
- gateway -> client: `text/event-stream` with OpenAI's event types and fields
  (`image_generation.partial_image` / `.completed`, `image_edit.*`), preceded by
  racm3's own `racm3.neighbours` event when the request asked for its neighbours.

Errors before the first byte are the usual JSON answers (a full queue is 429 because
`open_local_stream` lets the submit run to its first wait before returning). After the
first byte, an `error` event carries the same JSON error, and the stream ends. A client
that goes away cancels the job: the engine stops decoding it at the next step
(`model/partial.py`), so the batcher's next job does not wait for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import httpx
import numpy as np
from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from app.disconnect import run_until_disconnect
from app.errors import (
    ApiError,
    DependencyUnavailable,
    InternalError,
    QueueFull,
    RequestTimeout,
    error_from_body,
)
from app.images import decode_rgb_b64, png_b64
from app.schemas import (
    INTERNAL_IMAGE_LIMITS,
    GeneratedImageWire,
    Neighbour,
    StreamEventWire,
    UsageWire,
)
from model.jobs import GeneratedImage

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- the event model ---------------------------------------------------------------------


@dataclass
class PartialImage:
    index: int
    image: np.ndarray  # (H, W, 3) uint8, cells not generated yet in gray


@dataclass
class Usage:
    text_tokens: int = 0
    image_tokens: int = 0
    output_tokens: int = 0


@dataclass
class Finished:
    images: list[GeneratedImage]
    usage: Usage = field(default_factory=Usage)


class GenerationStream(Protocol):
    async def next(self) -> PartialImage | Finished:
        """The next event; `Finished` is the last. Raises the job's `ApiError`."""
        ...

    async def aclose(self) -> None:
        """Stop: the job is cancelled if it is still running. Idempotent."""
        ...


# --- engine -> worker ------------------------------------------------------------------


class StreamSink:
    """The engine's `Progress` for one job: events cross from the engine's thread to the
    event loop through `call_soon_threadsafe`; cancellation crosses the other way."""

    def __init__(self, loop: asyncio.AbstractEventLoop, partial_images: int) -> None:
        self._loop = loop
        self._partial_images = partial_images
        self._cancelled = threading.Event()
        self.events: asyncio.Queue[PartialImage] = asyncio.Queue()
        self.reported = Usage()

    @property
    def partial_images(self) -> int:
        return self._partial_images

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def partial(self, index: int, image: np.ndarray) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, PartialImage(index, image))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel()

    def usage(self, text_tokens: int, image_tokens: int, output_tokens: int) -> None:
        self.reported = Usage(text_tokens, image_tokens, output_tokens)


class LocalStream:
    def __init__(self, task: asyncio.Future, sink: StreamSink) -> None:
        self.task = task
        self.sink = sink

    async def next(self) -> PartialImage | Finished:
        while True:
            if not self.sink.events.empty():
                return self.sink.events.get_nowait()
            if self.task.done():
                # Partial images were queued before the result: the queue is drained first.
                return Finished(list(self.task.result()), self.sink.reported)
            getter = asyncio.ensure_future(self.sink.events.get())
            try:
                await asyncio.wait({getter, self.task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                return getter.result()

    async def aclose(self) -> None:
        self.sink.cancel()
        if not self.task.done():
            self.task.cancel()
        elif not self.task.cancelled():
            self.task.exception()  # retrieved: an error nobody reads is not logged as lost


async def open_local_stream(
    submit: Callable[[Any], Awaitable[list[GeneratedImage]]], job: Any, partial_images: int
) -> LocalStream:
    """Submit `job` with a sink attached; raise at once if it was refused (full queue,
    worker not ready), so the caller can still answer with a JSON error."""
    sink = StreamSink(asyncio.get_running_loop(), partial_images)
    job.progress = sink
    task = asyncio.ensure_future(submit(job))
    try:
        # The submit checks readiness and the queue bound before its first wait: one turn
        # of the loop runs it that far.
        await asyncio.sleep(0)
    except asyncio.CancelledError:
        sink.cancel()
        task.cancel()
        raise
    if task.done():
        task.result()  # raises the refusal
    return LocalStream(task, sink)


# --- worker -> gateway -------------------------------------------------------------------


def _line(event: StreamEventWire) -> bytes:
    return event.model_dump_json(exclude_none=True).encode() + b"\n"


async def ndjson_events(stream: GenerationStream) -> AsyncIterator[bytes]:
    while True:
        try:
            event = await stream.next()
        except ApiError as exc:
            yield _line(StreamEventWire(type="error", error=exc.body()["error"],
                                        status=exc.status_code))
            return
        except Exception:
            log.exception("streamed job failed")
            exc = InternalError("generation failed")
            yield _line(StreamEventWire(type="error", error=exc.body()["error"], status=500))
            return
        if isinstance(event, PartialImage):
            yield _line(StreamEventWire(type="partial_image", index=event.index,
                                        image=png_b64(event.image)))
            continue
        yield _line(StreamEventWire(
            type="completed",
            images=[GeneratedImageWire.from_result(g) for g in event.images],
            usage=UsageWire(**event.usage.__dict__),
        ))
        return


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its `GenerationStream`: also when the client
    left before the first byte, when the body iterator never even started."""

    def __init__(self, content: AsyncIterator[bytes], stream: GenerationStream,
                 on_close: Callable[[], None] | None = None, **kw: Any) -> None:
        super().__init__(content, **kw)
        self._stream = stream
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()
            if self._on_close is not None:
                self._on_close()


class HttpStream:
    """A worker's NDJSON stream, read line by line as it arrives."""

    def __init__(self, response: httpx.Response, release: Callable[[], None]) -> None:
        self.response = response
        self._lines = response.aiter_lines()
        self._release: Callable[[], None] | None = release

    async def next(self) -> PartialImage | Finished:
        while True:
            try:
                line = await self._lines.__anext__()
            except StopAsyncIteration:
                raise DependencyUnavailable("generator ended the stream early") from None
            except httpx.TimeoutException:
                raise RequestTimeout("generator did not answer in time") from None
            except httpx.HTTPError as exc:
                raise DependencyUnavailable(
                    f"generator stream failed ({type(exc).__name__})"
                ) from None
            if line.strip():
                break
        try:
            event = StreamEventWire.model_validate_json(line)
        except ValidationError:
            raise DependencyUnavailable("generator sent an invalid stream event") from None
        if event.type == "error":
            raise error_from_body(event.status or 503, {"error": event.error})
        if event.type == "partial_image" and event.image is not None:
            image = decode_rgb_b64(event.image, "image", INTERNAL_IMAGE_LIMITS)
            return PartialImage(int(event.index or 0), image)
        usage = event.usage or UsageWire()
        return Finished([g.to_result() for g in event.images or []], Usage(**usage.model_dump()))

    async def aclose(self) -> None:
        await self.response.aclose()
        if self._release is not None:
            self._release()
            self._release = None


# --- gateway -> client: OpenAI's server-sent events ------------------------------------


@dataclass(frozen=True)
class EventNames:
    partial: str
    completed: str


IMAGE_GENERATION = EventNames("image_generation.partial_image", "image_generation.completed")
IMAGE_EDIT = EventNames("image_edit.partial_image", "image_edit.completed")


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass
class StreamContext:
    """What every event of one streamed response repeats (OpenAI's fields)."""

    names: EventNames
    size: str
    seed: int
    quality: str = "auto"

    def common(self) -> dict[str, Any]:
        return {"created_at": int(time.time()), "size": self.size, "quality": self.quality,
                "background": "opaque", "output_format": "png"}


def neighbours_event(neighbours: list[Neighbour], memory_version: str | None,
                     seed: int) -> bytes:
    return sse("racm3.neighbours", {
        "type": "racm3.neighbours", "created_at": int(time.time()), "seed": seed,
        "memory_version": memory_version,
        "neighbours": [n.model_dump(exclude_none=True) for n in neighbours],
    })


def error_event(exc: ApiError) -> bytes:
    return sse("error", {"type": "error", **exc.body()})


def _usage(u: Usage) -> dict[str, Any]:
    inputs = u.text_tokens + u.image_tokens
    return {
        "input_tokens": inputs,
        "input_tokens_details": {"text_tokens": u.text_tokens, "image_tokens": u.image_tokens},
        "output_tokens": u.output_tokens,
        "total_tokens": inputs + u.output_tokens,
    }


async def sse_events(stream: GenerationStream, ctx: StreamContext, intro: bytes | None,
                     deadline: float, finite: Callable[[float], float]) -> AsyncIterator[bytes]:
    """The public event stream of one job, ending with its completed events or an error."""
    if intro is not None:
        yield intro
    while True:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            event = await asyncio.wait_for(stream.next(), remaining)
        except asyncio.TimeoutError:
            yield error_event(RequestTimeout("the stream took longer than the request timeout"))
            return
        except ApiError as exc:
            yield error_event(exc)
            return
        except Exception:
            log.exception("streamed generation failed")
            yield error_event(InternalError("generation failed"))
            return
        if isinstance(event, PartialImage):
            yield sse(ctx.names.partial, {
                "type": ctx.names.partial, "b64_json": png_b64(event.image),
                "partial_image_index": event.index, **ctx.common(),
            })
            continue
        for i, image in enumerate(event.images):
            yield sse(ctx.names.completed, {
                "type": ctx.names.completed, "b64_json": png_b64(image.image),
                **ctx.common(), "usage": _usage(event.usage),
                "image_index": i, "seed": ctx.seed, "score": finite(image.score),
            })
        return


Prepare = Callable[[Any], Awaitable[tuple[GenerationStream, bytes | None]]]


async def stream_images(gw: Any, request: Request, task: str, ctx: StreamContext,
                        prepare: Prepare, finite: Callable[[float], float]) -> StreamingResponse:
    """The gateway's streamed answer. `prepare(ticket)` retrieves, submits and returns the
    open stream (and the neighbours event, if any): everything that can still fail with a
    plain JSON error. The request counts as in flight until its stream ends."""
    s = gw.settings
    if gw.inflight >= s.max_inflight:
        raise QueueFull(f"gateway busy ({gw.inflight} requests in flight); retry later",
                        retry_after_s=s.retry_after_s)
    gw.inflight += 1
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            gw.inflight -= 1

    deadline = time.monotonic() + s.request_timeout_s
    try:
        with gw.expecting(task) as ticket:
            stream, intro = await asyncio.wait_for(
                run_until_disconnect(request, prepare(ticket)), s.request_timeout_s)
    except asyncio.TimeoutError:
        release()
        raise RequestTimeout(f"request took longer than {s.request_timeout_s:g} s") from None
    except BaseException:
        release()
        raise
    return ClosingStreamingResponse(
        sse_events(stream, ctx, intro, deadline, finite), stream, on_close=release,
        media_type="text/event-stream", headers=SSE_HEADERS,
    )
