"""How the gateway talks to the retriever and the generator: one interface, two transports.

- `InProcess*Client` calls the service object in the same process (embedded mode).
- `Http*Client` calls the role's internal routes; the generator client balances across
  several worker URLs by readiness, then load, and moves a job on to the next worker
  when one refuses the connection or answers 503. It also admits jobs before the gateway
  retrieves for them (`expecting`): beyond what the ready workers are sure to take (each
  one's queue plus the job it runs, from its /v1/info), a job is refused at once with a
  429.

Both raise the same `ApiError`s: an upstream error answer is rebuilt (a worker's 429
stays a 429), an unreachable service is 503, a timeout 504.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from app.batching import Ticket
from app.errors import ApiError, DependencyUnavailable, QueueFull, RequestTimeout, error_from_body
from app.generator.service import GeneratorService
from app.images import png_b64
from app.retriever.service import RetrievalQuery, RetrieverService, SearchOutcome
from app.schemas import (
    GENERATOR_TASKS,
    QueryWire,
    ReadyResponse,
    ReloadResponse,
    SearchRequest,
    SearchResponse,
)
from app.streaming import GenerationStream, HttpStream, open_local_stream

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class RetrieverClient(Protocol):
    async def search(
        self,
        queries: list[RetrievalQuery],
        k: int,
        strategy: str = "rag",
        *,
        mode: str | None = None,
        tokens: bool = True,
        thumbnails: bool = False,
        memory: str | None = None,
    ) -> SearchOutcome: ...

    async def reload(self, memory: str | None = None) -> ReloadResponse: ...

    async def readiness(self) -> ReadyResponse: ...

    async def info(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class GeneratorClient(Protocol):
    async def generate(self, task: str, job: Any) -> Any:
        """The result of one job of `task`, a key of `GENERATOR_TASKS`: the engine's
        method of that name, with that method's job and result types."""
        ...

    async def stream(self, task: str, job: Any, partial_images: int) -> GenerationStream:
        """The job submitted, its events to read (app/streaming.py); raises if refused.
        Only the tasks that decode images stream."""
        ...

    async def readiness(self) -> ReadyResponse: ...

    async def info(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


def _status(ready: bool, checks: dict[str, str]) -> ReadyResponse:
    if not ready:
        return ReadyResponse(status="not_ready", checks=checks)
    degraded = any(v.startswith("degraded") for v in checks.values())
    return ReadyResponse(status="degraded" if degraded else "ready", checks=checks)


# --- in-process ---------------------------------------------------------------------------


class InProcessRetrieverClient:
    def __init__(self, service: RetrieverService) -> None:
        self.service = service

    async def search(
        self,
        queries: list[RetrievalQuery],
        k: int,
        strategy: str = "rag",
        *,
        mode: str | None = None,
        tokens: bool = True,
        thumbnails: bool = False,
        memory: str | None = None,
    ) -> SearchOutcome:
        if not self.service.ready:
            raise DependencyUnavailable(f"retriever is not ready ({self.service.state})")
        return await self.service.search(
            queries, k, strategy, mode=mode, tokens=tokens, thumbnails=thumbnails,
            memory=memory,
        )

    async def reload(self, memory: str | None = None) -> ReloadResponse:
        return await self.service.reload(memory)

    async def readiness(self) -> ReadyResponse:
        return _status(self.service.ready, await self.service.checks())

    async def info(self) -> dict[str, Any]:
        return {"memory": self.service.describe(), "cache": self.service.cache.describe()}

    async def close(self) -> None:
        return None


class InProcessGeneratorClient:
    def __init__(self, service: GeneratorService) -> None:
        self.service = service

    async def generate(self, task: str, job: Any) -> Any:
        return await self.service.generate(task, job)

    async def stream(self, task: str, job: Any, partial_images: int) -> GenerationStream:
        return await open_local_stream(partial(self.service.generate, task), job, partial_images)

    async def readiness(self) -> ReadyResponse:
        return _status(self.service.ready, await self.service.checks())

    async def info(self) -> dict[str, Any]:
        return self.service.describe()

    async def close(self) -> None:
        return None


# --- HTTP -----------------------------------------------------------------------------------


class _HttpBase:
    name = "service"

    def __init__(
        self, timeout_s: float, api_key: str | None, client: httpx.AsyncClient | None = None
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=2.0),
            headers=headers,
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
        )

    async def _request(
        self, method: str, url: str, body: BaseModel | None, model: type[M]
    ) -> M:
        with self._transport_errors(url):
            response = await self.http.request(
                method,
                url,
                content=None if body is None else body.model_dump_json(exclude_none=True),
                headers={"Content-Type": "application/json"} if body is not None else None,
            )
        if response.status_code != 200:
            try:
                payload: Any = response.json()
            except ValueError:
                payload = None
            raise _error_answer(response, payload)
        try:
            return model.model_validate_json(response.content)
        except ValidationError:
            raise DependencyUnavailable(f"{self.name} answered with an invalid body") from None

    @contextlib.contextmanager
    def _transport_errors(self, url: str) -> Iterator[None]:
        """httpx's failures as `ApiError`s; a refused connection as `_Unreachable`, so that
        the caller may try another replica."""
        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
            raise _Unreachable(
                f"{self.name} at {url} is unreachable ({type(exc).__name__})"
            ) from None
        except httpx.TimeoutException:
            raise RequestTimeout(f"{self.name} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise DependencyUnavailable(
                f"{self.name} request failed ({type(exc).__name__})"
            ) from None

    async def _ready(self, base: str) -> ReadyResponse:
        try:
            response = await self.http.get(f"{base}/readyz", timeout=2.0)
            return ReadyResponse.model_validate_json(response.content)
        except (httpx.HTTPError, ValidationError) as exc:
            return ReadyResponse(
                status="not_ready", checks={self.name: f"unreachable: {type(exc).__name__}"}
            )

    async def close(self) -> None:
        await self.http.aclose()


class _Unavailable(DependencyUnavailable):
    """The service answered 503 (loading, or one of its own dependencies is down): it did
    not take the job, so another replica may."""


class _Unreachable(_Unavailable):
    """Connection refused / reset: safe to try another replica (nothing was processed)."""


def _error_answer(response: httpx.Response, payload: Any) -> ApiError:
    """The service's error answer rebuilt; a 503 as `_Unavailable`, as it took no job."""
    err = error_from_body(response.status_code, payload, response.headers)
    if response.status_code == 503:
        return _Unavailable(err.message, code=err.code)
    return err


class HttpRetrieverClient(_HttpBase):
    name = "retriever"

    def __init__(
        self, base_url: str, timeout_s: float = 30.0, api_key: str | None = None, **kw: Any
    ) -> None:
        super().__init__(timeout_s, api_key, **kw)
        self.base = base_url.rstrip("/")

    async def search(
        self,
        queries: list[RetrievalQuery],
        k: int,
        strategy: str = "rag",
        *,
        mode: str | None = None,
        tokens: bool = True,
        thumbnails: bool = False,
        memory: str | None = None,
    ) -> SearchOutcome:
        wire = SearchRequest(
            queries=[
                QueryWire(
                    text=q.text,
                    image=None if q.image is None else png_b64(q.image),
                    embedding=None if q.embedding is None else [float(x) for x in q.embedding],
                )
                for q in queries
            ],
            k=k,
            strategy=strategy,  # type: ignore[arg-type]
            mode=mode,  # type: ignore[arg-type]
            tokens=tokens,
            thumbnails=thumbnails,
            memory=memory,
        )
        out = await self._request("POST", f"{self.base}/internal/search", wire, SearchResponse)
        return SearchOutcome(
            out.memory_version, [[n.to_doc() for n in docs] for docs in out.results],
            memory=out.memory,
        )

    async def reload(self, memory: str | None = None) -> ReloadResponse:
        query = "" if memory is None else f"?memory={quote(memory)}"
        return await self._request("POST", f"{self.base}/admin/reload{query}", None,
                                   ReloadResponse)

    async def readiness(self) -> ReadyResponse:
        return await self._ready(self.base)

    async def info(self) -> dict[str, Any]:
        try:
            response = await self.http.get(f"{self.base}/v1/info", timeout=2.0)
            data = response.json()
        except (httpx.HTTPError, ValueError):
            return {"memory": {"state": "unreachable"}}
        return {"memory": data.get("memory"), "cache": data.get("cache")}


@dataclass
class _Worker:
    base: str
    inflight: int = 0
    ready: bool | None = None  # what its last probe or answer said; None: not asked yet
    known_at: float = -math.inf  # monotonic time of that
    probe: asyncio.Task | None = None
    # Jobs in flight it is sure to take: a worker queues a job while fewer than its
    # `queue_size` wait, and runs at least one, however its batches form (it may take
    # more, when its running batch holds several). None: not known yet.
    capacity: int | None = None


class _Arrival(Ticket):
    """An admitted job's place, held until the job is sent (or given up)."""

    def __init__(self, client: HttpGeneratorClient) -> None:
        self._client: HttpGeneratorClient | None = client

    def arrived(self) -> None:
        if self._client is not None:
            self._client.expected -= 1
            self._client = None


class HttpGeneratorClient(_HttpBase):
    """Balances jobs across generator workers by readiness, then load.

    Each worker's readiness comes from its `/readyz`, asked lazily: on first use the
    caller waits for the answer; afterwards a result older than `readiness_ttl_s` is
    refreshed in the background while the last one keeps being used. Ready workers are
    tried first, least in flight first, round-robin among ties. A worker that refuses
    the connection or answers 503 counts as not ready until its next probe, and the job
    goes to the next worker: a loading worker answers 503 fast, and would otherwise draw
    most of the traffic.
    """

    name = "generator"

    def __init__(
        self,
        base_urls: list[str],
        timeout_s: float = 65.0,
        api_key: str | None = None,
        readiness_ttl_s: float = 1.0,
        retry_after_s: int = 1,
        **kw: Any,
    ) -> None:
        if not base_urls:
            raise ValueError("at least one generator URL is needed")
        super().__init__(timeout_s, api_key, **kw)
        self.workers = [_Worker(u.rstrip("/")) for u in base_urls]
        self.readiness_ttl_s = readiness_ttl_s
        self._rotation = itertools.count()
        self.expected = 0  # admitted jobs not sent yet (their neighbours are retrieved)
        self.retry_after_s = retry_after_s

    @property
    def capacity(self) -> int | None:
        """Jobs the workers not known to be down hold at once; None while unknown."""
        known = [w.capacity for w in self.workers if w.ready is not False]
        if not known or any(c is None for c in known):
            return None
        return sum(c for c in known if c is not None)

    @property
    def jobs_in_flight(self) -> int:
        return sum(w.inflight for w in self.workers)

    @contextlib.contextmanager
    def expecting(self, task: Hashable) -> Iterator[Ticket]:
        """Admit a job of `task` before anything is done for it: a 429 when the jobs in
        flight and those admitted fill the workers' capacity (unknown capacity: admitted,
        and the worker decides). The place is held until `ticket.arrived()`, right before
        the job is sent, when the job counts as in flight instead."""
        capacity = self.capacity
        if capacity is not None and self.jobs_in_flight + self.expected >= capacity:
            raise QueueFull(f"generator workers are full ({capacity} jobs in flight or "
                            "queued); retry later", retry_after_s=self.retry_after_s)
        self.expected += 1
        ticket = _Arrival(self)
        try:
            yield ticket
        finally:
            ticket.arrived()

    def _mark(self, worker: _Worker, ready: bool) -> None:
        worker.ready = ready
        worker.known_at = time.monotonic()

    async def _probe(self, worker: _Worker) -> ReadyResponse:
        answer = await self._ready(worker.base)
        self._mark(worker, answer.status != "not_ready")
        if worker.ready and worker.capacity is None:
            worker.capacity = await self._capacity(worker)
        return answer

    async def _capacity(self, worker: _Worker) -> int | None:
        try:
            response = await self.http.get(f"{worker.base}/v1/info", timeout=2.0)
            described = response.json().get("generator") or {}
            return int(described["queue_size"]) + 1
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _refresh(self, worker: _Worker) -> asyncio.Task:
        """The worker's running probe, or a new one (one probe per worker at a time)."""
        if worker.probe is None or worker.probe.done():
            worker.probe = asyncio.create_task(self._probe(worker))
        return worker.probe

    async def _order(self) -> list[_Worker]:
        """Ready first; then least in flight; ties in round-robin order."""
        unknown = [self._refresh(w) for w in self.workers if w.ready is None]
        if unknown:
            # `wait`, not `gather`: a caller that is cancelled must not cancel the probes.
            await asyncio.wait(unknown)
        stale_before = time.monotonic() - self.readiness_ttl_s
        for w in self.workers:
            if w.known_at < stale_before:
                self._refresh(w)
        start = next(self._rotation) % len(self.workers)
        rotated = self.workers[start:] + self.workers[:start]
        return sorted(rotated, key=lambda w: (not w.ready, w.inflight))

    async def _call(self, send: Callable[[_Worker], Awaitable[T]]) -> T:
        """`send(worker)` on the best worker, moving on to the next while one is
        unavailable (it took no job)."""
        last: DependencyUnavailable | None = None
        for worker in await self._order():
            worker.inflight += 1
            try:
                return await send(worker)
            except _Unavailable as exc:
                self._mark(worker, False)
                last = exc
            finally:
                worker.inflight -= 1
        why = last.message if last else "no workers"
        raise DependencyUnavailable(f"no generator worker is available ({why})")

    async def generate(self, task: str, job: Any) -> Any:
        wire = GENERATOR_TASKS[task]
        body = wire.job.from_job(job)
        out = await self._call(lambda worker: self._request(
            "POST", f"{worker.base}/internal/{task}", body, wire.result))
        return out.to_result()

    async def stream(self, task: str, job: Any, partial_images: int) -> GenerationStream:
        stream_job = GENERATOR_TASKS[task].stream_job
        if stream_job is None:
            raise ValueError(f"the generator task {task!r} does not stream")
        body = stream_job.from_job(job).model_copy(update={"partial_images": partial_images})
        return await self._call(
            lambda worker: self._open_stream(worker, f"/internal/{task}/stream", body))

    async def _open_stream(self, worker: _Worker, path: str, body: BaseModel) -> HttpStream:
        """POST to a worker's streamed route and hand back its open NDJSON stream; the
        worker counts one more job in flight until the stream is closed."""
        url = f"{worker.base}{path}"
        request = self.http.build_request(
            "POST", url, content=body.model_dump_json(exclude_none=True),
            headers={"Content-Type": "application/json"},
        )
        with self._transport_errors(url):
            response = await self.http.send(request, stream=True)
        if response.status_code != 200:
            try:
                raw = await response.aread()
                payload: Any = json.loads(raw) if raw else None
            except (httpx.HTTPError, ValueError):
                payload = None
            finally:
                await response.aclose()
            raise _error_answer(response, payload)
        worker.inflight += 1

        def release() -> None:
            worker.inflight -= 1

        return HttpStream(response, release)

    async def readiness(self) -> ReadyResponse:
        answers = await asyncio.gather(*(self._probe(w) for w in self.workers))
        checks = {
            f"generator[{i}]": a.status if a.status != "not_ready" else _why(a)
            for i, a in enumerate(answers)
        }
        ready = any(a.status != "not_ready" for a in answers)
        return ReadyResponse(status="ready" if ready else "not_ready", checks=checks)

    async def info(self) -> dict[str, Any]:
        for worker in await self._order():
            try:
                response = await self.http.get(f"{worker.base}/v1/info", timeout=2.0)
                if response.status_code == 200:
                    return dict(response.json().get("generator") or {})
            except (httpx.HTTPError, ValueError):
                continue
        return {"state": "unreachable"}

    async def close(self) -> None:
        probes = [w.probe for w in self.workers if w.probe is not None and not w.probe.done()]
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        await super().close()


def _why(answer: ReadyResponse) -> str:
    detail = "; ".join(f"{k}={v}" for k, v in answer.checks.items())
    return f"not_ready ({detail})" if detail else "not_ready"
