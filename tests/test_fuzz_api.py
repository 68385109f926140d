"""Fuzzing the public API from its own OpenAPI document (schemathesis).

A live embedded server on the smoke bundle's real engine and memory, with API keys, gets
cases generated from `/openapi.json`: valid ones and, as schemathesis does by default,
invalid ones. No answer may be a 5xx, and every answer must be what the document says:
a documented status, content type, headers and body schema, and 401 without the key.

The server's limits are lowered (n, candidates, k, prompt length) so that valid
generation requests stay cheap on a CPU; the document carries those limits, so the
generated cases respect them. The number of cases is bounded to keep the run short.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.serve import create_role_app
from app.settings import GatewaySettings, GeneratorSettings, RetrieverSettings
from tests.live import live_app, real_models  # noqa: F401 - fixture

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Bounded for `make test`; RACM3_FUZZ_CASES=500 fuzzes deeper by hand.
CASES_PER_OPERATION = int(os.environ.get("RACM3_FUZZ_CASES", "12"))
# Valid cases that these operations must mostly accept: if the document drifts from what
# the server takes, the fuzz would only meet 4xx and test nothing.
MUST_ACCEPT = {("/v1/images/generations", "POST"), ("/healthz", "GET"), ("/readyz", "GET"),
               ("/v1/info", "GET")}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    ignored_auth,
]


@pytest.fixture(scope="module")
def fuzz_server(real_models):  # noqa: F811 - fixture
    app = real_models.app(
        gateway={
            "api_keys": [KEY], "max_n": 2, "max_candidates": 2,
            "max_labels": 4, "max_examples": 1,
            "request_timeout_s": 30,
        },
        generator={"max_wait_ms": 1},
    )
    with live_app(app) as live:
        yield live


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


def _operations() -> list[tuple[str, str, GenerationMode]]:
    """Every documented operation, from the app's own document (no model is loaded for
    that): valid cases for each, invalid ones for each that takes a body."""
    app = create_role_app(
        "embedded", gateway_settings=GatewaySettings(), retriever_settings=RetrieverSettings(),
        generator_settings=GeneratorSettings(), engine_factory=lambda s: None,
        backend_factory=lambda s: None,
    )
    out = []
    for path, item in app.openapi()["paths"].items():
        for method, operation in item.items():
            out.append((path, method.upper(), GenerationMode.POSITIVE))
            if "requestBody" in operation:
                out.append((path, method.upper(), GenerationMode.NEGATIVE))
    return out


@pytest.mark.parametrize(
    "path,method,mode", _operations(), ids=lambda v: getattr(v, "value", v)
)
def test_no_5xx_and_answers_match_the_document(api_schema, path, method, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=CASES_PER_OPERATION,
        deadline=None,
        derandomize=True,  # the same cases each run: a failure here is reproducible
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def call(case: schemathesis.Case) -> None:
        response = case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=60)
        statuses.append(response.status_code)

    statuses: list[int] = []
    call()
    assert statuses, "no case was sent"
    if mode is GenerationMode.POSITIVE and (path, method) in MUST_ACCEPT:
        accepted = sum(200 <= s < 300 for s in statuses)
        assert accepted >= len(statuses) // 3, f"only {accepted} of {statuses} accepted"
