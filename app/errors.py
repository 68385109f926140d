"""Errors as the API reports them: always `{"error": {"message", "type", "param", "code"}}`.

Service code raises an `ApiError` subclass; `install_error_handlers` turns it, FastAPI's
validation errors, routing errors and anything unexpected into that JSON shape. Nothing
ever returns a traceback.
"""

from __future__ import annotations

import logging
import math
import secrets
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


class InvalidRequest(ApiError):
    status_code = 422
    error_type = "invalid_request_error"
    default_code = "invalid_value"


class PayloadTooLarge(ApiError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class Unauthorized(ApiError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str = "missing or invalid API key", **kw: Any) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"}, **kw)


class QueueFull(ApiError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"

    def __init__(self, message: str = "server busy: queue full", retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(max(0, retry_after_s))})


class DependencyUnavailable(ApiError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "dependency_unavailable"

    def __init__(self, message: str, retry_after_s: int = 1, **kw: Any) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)}, **kw)


class NotReady(DependencyUnavailable):
    default_code = "not_ready"


class RequestTimeout(ApiError):
    status_code = 504
    error_type = "timeout_error"
    default_code = "timeout"


class InternalError(ApiError):
    status_code = 500
    error_type = "server_error"
    default_code = "internal_error"


_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    413: PayloadTooLarge,
    422: InvalidRequest,
    503: DependencyUnavailable,
    504: RequestTimeout,
}


def error_from_body(status: int, body: Any, headers: Mapping[str, str] | None = None) -> ApiError:
    """Rebuild the error an internal service answered with, so the gateway can pass it on."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"message": f"upstream answered HTTP {status}"}
    message = str(err.get("message") or f"upstream answered HTTP {status}")
    if status == 429:
        retry = (headers or {}).get("retry-after", "1")
        return QueueFull(message, retry_after_s=int(retry) if retry.isdigit() else 1)
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = InvalidRequest if 400 <= status < 500 else DependencyUnavailable
    if cls is Unauthorized:
        return Unauthorized(message)
    if issubclass(cls, DependencyUnavailable):
        return cls(message, code=err.get("code"))
    out = cls(message, param=err.get("param"), code=err.get("code"))
    if 400 <= status < 500:
        out.status_code = status
    return out


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)[:80]


def _validation_message(exc: RequestValidationError, request: Request) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    content_type = request.headers.get("content-type", "")
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"request body is not valid JSON: {ctx.get('error', 'decode error')}", None
    if kind in ("model_attributes_type", "dict_type", "model_type") and not loc:
        if "json" not in content_type:
            return (
                f"expected a JSON body with Content-Type: application/json, got "
                f"{content_type or 'no Content-Type'}"
            ), None
        return "request body must be a JSON object", None
    msg = first.get("msg", "invalid value")
    if "input" in first and kind != "missing":
        msg = f"{msg} (got {_json_safe(first['input'])!s:.80})"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    where = f"{param}: " if param else ""
    return f"{where}{msg}{more}", param


ErrorHook = Callable[[str, int], None]


def install_error_handlers(app: FastAPI, on_error: ErrorHook | None = None) -> None:
    """Register the JSON error shape for every failure path; `on_error(type, status)` counts."""

    def note(error_type: str, status: int) -> None:
        if on_error is not None:
            on_error(error_type, status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        note(exc.error_type, exc.status_code)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc, request)
        err = InvalidRequest(message, param=param)
        note(err.error_type, 422)
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 400:
            # FastAPI's only 400 is "could not parse the body" (e.g. non-UTF-8 bytes
            # declared as JSON): that is invalid input, which this API reports as 422.
            err: ApiError = InvalidRequest(
                "request body could not be parsed (expected UTF-8 JSON)", code="invalid_body"
            )
        else:
            err = ApiError(str(exc.detail), code=f"http_{status}")
            err.status_code = status
            err.error_type = "invalid_request_error" if status < 500 else "server_error"
            err.headers = dict(exc.headers or {})
        note(err.error_type, err.status_code)
        return error_response(err)

    # Not `exception_handler(Exception)`: Starlette runs that one in its outermost
    # middleware, which re-raises after answering, and the server then drops the
    # keep-alive connection and logs the whole traceback.
    app.add_middleware(UnexpectedErrorMiddleware, on_error=on_error)


class UnexpectedErrorMiddleware:
    """Answer any exception that no handler took with a JSON 500, and log it on one line.

    The error id in the log line is also in the response (message and `X-Error-Id`), so a
    client's report leads to the log. The connection stays usable: the exception stops
    here instead of reaching the server. When the response had already started (a
    stream), nothing sane can be sent any more; the server then closes the connection.
    """

    def __init__(self, app: Any, on_error: ErrorHook | None = None) -> None:
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            error_id = secrets.token_hex(6)
            log.error(
                "unhandled %s on %s %s [error_id=%s]: %s (at %s)",
                type(exc).__name__, scope.get("method"), scope.get("path"), error_id,
                _one_line(str(exc)), _where(exc),
            )
            if self.on_error is not None:
                self.on_error(InternalError.error_type, InternalError.status_code)
            if started:
                return
            err = InternalError(f"internal server error (error id {error_id})")
            err.headers["X-Error-Id"] = error_id
            await error_response(err)(scope, receive, send)


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def _where(exc: BaseException) -> str:
    """file:line in function, of the frame that raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown"
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno} in {last.name}"


class BodyLimitMiddleware:
    """Reject bodies over `max_bytes` with 413, counting the bytes actually received.

    Content-Length is only a hint: a chunked or lying client is caught by the count. The
    body is buffered (it is bounded) and replayed to the app, whose later `receive()`
    calls then reach the server again, which is how handlers notice a disconnect.
    """

    def __init__(self, app: Any, max_bytes: int, on_error: ErrorHook | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_error = on_error

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._reject(send)
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Callable) -> None:
        err = PayloadTooLarge(f"request body is larger than {self.max_bytes} bytes")
        if self.on_error is not None:
            self.on_error(err.error_type, err.status_code)
        payload = JSONResponse(err.body()).body
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
