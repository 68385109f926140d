"""An unexpected error answers a JSON 500 on an intact keep-alive connection, and logs one
line whose error id is also in the response.

The server is the real embedded app on the real engine and memory, over real HTTP. No
valid input is known to make the product fail (finding those is what the fuzz test and
the bad-input tests are for), so the failure is injected: one extra route that raises,
added to the real app, behind the real middleware stack.
"""

from __future__ import annotations

import logging

import httpx
import pytest

from tests.live import live_app, real_models  # noqa: F401 - fixture


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server(real_models):  # noqa: F811 - fixture
    app = real_models.app(generator={"max_wait_ms": 1})

    @app.post("/test/fail")
    async def fail() -> dict:
        raise RuntimeError("injected failure: the disk is on fire")

    with live_app(app) as live:
        yield live


@pytest.fixture
def logged():
    """What the app and uvicorn log at WARNING and above: the root logger's and uvicorn's
    (whose loggers do not propagate to the root)."""
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("uvicorn", "")]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler.records
    for lg in loggers:
        lg.removeHandler(handler)


def _client_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_500_keeps_the_connection_and_answers_json(server, logged):
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(base_url=server.url, timeout=30, limits=limits) as client:
        before = client.get("/healthz")
        port = _client_port(before)
        failed = client.post("/test/fail")
        after = client.post("/v1/retrieve", json={"text": "a red square", "k": 2})
        assert _client_port(after) == port, "the 500 closed the keep-alive connection"
    assert failed.status_code == 500
    assert failed.headers.get("connection", "").lower() != "close"
    err = failed.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "server_error" and err["code"] == "internal_error"
    assert "disk is on fire" not in failed.text and "Traceback" not in failed.text
    error_id = failed.headers["x-error-id"]
    assert len(error_id) >= 8 and error_id in err["message"]
    assert after.status_code == 200 and after.json()["data"]

    # One log line, no traceback, carrying the id that the client was given.
    errors = [r for r in logged if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage()[:200] for r in errors]
    record = errors[0]
    line = record.getMessage()
    assert record.exc_info is None and "\n" not in line
    assert error_id in line and "RuntimeError" in line and "/test/fail" in line


def test_500_is_counted_as_a_server_error(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/test/fail").status_code == 500
        text = client.get("/metrics").text
    assert 'racm3_errors_total{type="server_error"}' in text
    assert 'racm3_requests_total{route="/test/fail",status="500"}' in text
