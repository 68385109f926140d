"""How the gateway talks to the retriever and the generator: one interface, two transports.

- `InProcess*Client` calls the service object in the same process (embedded mode).
- `Http*Client` calls the role's internal routes; the generator client balances across
  several worker URLs (least in flight, round-robin among ties) and skips a worker that
  refused a connection for a short while.

Both raise the same `ApiError`s: an upstream error answer is rebuilt (a worker's 429
stays a 429), an unreachable service is 503, a timeout 504.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, Protocol, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from app.errors import DependencyUnavailable, RequestTimeout, error_from_body
from app.generator.protocol import (
    CaptionJob,
    ClassifyJob,
    ClassifyResult,
    GeneratedCaption,
    GeneratedImage,
    InfillJob,
    T2IJob,
)
from app.generator.service import GeneratorService
from app.images import png_b64
from app.retriever.service import RetrievalQuery, RetrieverService, SearchOutcome
from app.schemas import (
    CaptionJobWire,
    CaptionsResultWire,
    ClassifyJobWire,
    ClassifyResultWire,
    ImagesResultWire,
    InfillJobWire,
    QueryWire,
    ReadyResponse,
    ReloadResponse,
    SearchRequest,
    SearchResponse,
    T2IJobWire,
)

M = TypeVar("M", bound=BaseModel)


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
    ) -> SearchOutcome: ...

    async def reload(self) -> ReloadResponse: ...

    async def readiness(self) -> ReadyResponse: ...

    async def info(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class GeneratorClient(Protocol):
    async def text_to_image(self, job: T2IJob) -> list[GeneratedImage]: ...

    async def caption(self, job: CaptionJob) -> list[GeneratedCaption]: ...

    async def infill(self, job: InfillJob) -> list[GeneratedImage]: ...

    async def classify(self, job: ClassifyJob) -> ClassifyResult: ...

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
    ) -> SearchOutcome:
        if not self.service.ready:
            raise DependencyUnavailable(f"retriever is not ready ({self.service.state})")
        return await self.service.search(
            queries, k, strategy, mode=mode, tokens=tokens, thumbnails=thumbnails
        )

    async def reload(self) -> ReloadResponse:
        return await self.service.reload()

    async def readiness(self) -> ReadyResponse:
        return _status(self.service.ready, await self.service.checks())

    async def info(self) -> dict[str, Any]:
        return {"memory": self.service.describe(), "cache": self.service.cache.describe()}

    async def close(self) -> None:
        return None


class InProcessGeneratorClient:
    def __init__(self, service: GeneratorService) -> None:
        self.service = service

    async def text_to_image(self, job: T2IJob) -> list[GeneratedImage]:
        return await self.service.text_to_image(job)

    async def caption(self, job: CaptionJob) -> list[GeneratedCaption]:
        return await self.service.caption(job)

    async def infill(self, job: InfillJob) -> list[GeneratedImage]:
        return await self.service.infill(job)

    async def classify(self, job: ClassifyJob) -> ClassifyResult:
        return await self.service.classify(job)

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
        try:
            response = await self.http.request(
                method,
                url,
                content=None if body is None else body.model_dump_json(exclude_none=True),
                headers={"Content-Type": "application/json"} if body is not None else None,
            )
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
        if response.status_code != 200:
            try:
                payload: Any = response.json()
            except ValueError:
                payload = None
            raise error_from_body(response.status_code, payload, response.headers)
        try:
            return model.model_validate_json(response.content)
        except ValidationError:
            raise DependencyUnavailable(f"{self.name} answered with an invalid body") from None

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


class _Unreachable(DependencyUnavailable):
    """Connection refused / reset: safe to try another replica (nothing was processed)."""


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
        )
        out = await self._request("POST", f"{self.base}/internal/search", wire, SearchResponse)
        return SearchOutcome(
            out.memory_version, [[n.to_doc() for n in docs] for docs in out.results]
        )

    async def reload(self) -> ReloadResponse:
        return await self._request("POST", f"{self.base}/admin/reload", None, ReloadResponse)

    async def readiness(self) -> ReadyResponse:
        return await self._ready(self.base)

    async def info(self) -> dict[str, Any]:
        try:
            response = await self.http.get(f"{self.base}/v1/info", timeout=2.0)
            data = response.json()
        except (httpx.HTTPError, ValueError):
            return {"memory": {"state": "unreachable"}}
        return {"memory": data.get("memory"), "cache": data.get("cache")}


class HttpGeneratorClient(_HttpBase):
    name = "generator"
    unreachable_backoff_s = 2.0

    def __init__(
        self, base_urls: list[str], timeout_s: float = 65.0, api_key: str | None = None, **kw: Any
    ) -> None:
        if not base_urls:
            raise ValueError("at least one generator URL is needed")
        super().__init__(timeout_s, api_key, **kw)
        self.bases = [u.rstrip("/") for u in base_urls]
        self.inflight = {b: 0 for b in self.bases}
        self._down_until = {b: 0.0 for b in self.bases}
        self._rotation = itertools.count()

    def _order(self) -> list[str]:
        """Least in flight first; ties in round-robin order; recently refused ones last."""
        start = next(self._rotation) % len(self.bases)
        rotated = self.bases[start:] + self.bases[:start]
        now = time.monotonic()
        return sorted(rotated, key=lambda b: (self._down_until[b] > now, self.inflight[b]))

    async def _call(self, path: str, body: BaseModel, model: type[M]) -> M:
        last: DependencyUnavailable | None = None
        for base in self._order():
            self.inflight[base] += 1
            try:
                return await self._request("POST", f"{base}{path}", body, model)
            except _Unreachable as exc:
                self._down_until[base] = time.monotonic() + self.unreachable_backoff_s
                last = exc
            finally:
                self.inflight[base] -= 1
        why = last.message if last else "no workers"
        raise DependencyUnavailable(f"no generator worker reachable ({why})")

    async def text_to_image(self, job: T2IJob) -> list[GeneratedImage]:
        wire = T2IJobWire.from_job(job)
        out = await self._call("/internal/text_to_image", wire, ImagesResultWire)
        return [g.to_result() for g in out.images]

    async def caption(self, job: CaptionJob) -> list[GeneratedCaption]:
        wire = CaptionJobWire.from_job(job)
        out = await self._call("/internal/caption", wire, CaptionsResultWire)
        return [c.to_result() for c in out.captions]

    async def infill(self, job: InfillJob) -> list[GeneratedImage]:
        out = await self._call("/internal/infill", InfillJobWire.from_job(job), ImagesResultWire)
        return [g.to_result() for g in out.images]

    async def classify(self, job: ClassifyJob) -> ClassifyResult:
        wire = ClassifyJobWire.from_job(job)
        out = await self._call("/internal/classify", wire, ClassifyResultWire)
        return out.to_result()

    async def readiness(self) -> ReadyResponse:
        answers = await asyncio.gather(*(self._ready(b) for b in self.bases))
        checks = {
            f"generator[{i}]": a.status if a.status != "not_ready" else _why(a)
            for i, a in enumerate(answers)
        }
        ready = any(a.status != "not_ready" for a in answers)
        return ReadyResponse(status="ready" if ready else "not_ready", checks=checks)

    async def info(self) -> dict[str, Any]:
        for base in self._order():
            try:
                response = await self.http.get(f"{base}/v1/info", timeout=2.0)
                if response.status_code == 200:
                    return dict(response.json().get("generator") or {})
            except (httpx.HTTPError, ValueError):
                continue
        return {"state": "unreachable"}


def _why(answer: ReadyResponse) -> str:
    detail = "; ".join(f"{k}={v}" for k, v in answer.checks.items())
    return f"not_ready ({detail})" if detail else "not_ready"
