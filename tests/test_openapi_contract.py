"""The OpenAPI document says what the server does, and the server does what it says.

Real HTTP against an embedded server on the smoke bundle's engine and memory, with API
keys and lowered limits, so that the document's numbers are visibly the configured ones.
"""

from __future__ import annotations

import httpx
import pytest

from app.schemas import ErrorResponse, InfoResponse
from app.serve import create_role_app
from app.settings import GatewaySettings, GeneratorSettings, RetrieverSettings
from tests.live import live_app, real_models  # noqa: F401 - fixture

KEY = "contract-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = {"max_n": 3, "max_candidates": 5, "max_k": 4, "max_knn_results": 12,
          "max_prompt_chars": 200, "max_labels": 6, "max_examples": 2}
PUBLIC_POSTS = ["/v1/images/generations", "/v1/images/edits", "/v1/images/infill",
                "/v1/images/captions", "/v1/images/classify", "/v1/retrieve", "/knn-service"]
GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def server(real_models):  # noqa: F811 - fixture
    app = real_models.app(gateway={"api_keys": [KEY], **LIMITS}, generator={"max_wait_ms": 1})
    with live_app(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        yield c


@pytest.fixture(scope="module")
def doc(client) -> dict:
    return client.get("/openapi.json").json()


def props(doc: dict, schema: str) -> dict:
    return doc["components"]["schemas"][schema]["properties"]


def non_null(prop: dict) -> dict:
    return next((b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"), prop)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text[:300]
    err = ErrorResponse.model_validate(response.json()).error
    if param is not None:
        assert err.param == param, err
    return err.model_dump()


def test_errors_are_documented_in_the_shape_they_have(client, doc):
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path in PUBLIC_POSTS:
        responses = doc["paths"][path]["post"]["responses"]
        for status in ("401", "413", "422", "429", "503"):
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)
        assert "Retry-After" in responses["429"]["headers"]
    # ...and the answers have that shape.
    assert_error(client.post(GEN, json={"prompt": "a", "n": "two"}), 422, "n")
    assert_error(httpx.post(f"{client.base_url}{GEN}", json={"prompt": "a"}), 401)
    big = {"prompt": "a" * 100, "image": "A" * (9 * 1024 * 1024)}
    assert_error(client.post("/v1/images/infill", json=big), 413)


def test_every_bound_is_a_json_schema_keyword(doc):
    """Pydantic can leave `ge`/`le` in a schema, which JSON Schema ignores: a bound lost."""
    def keys(node):
        if isinstance(node, dict):
            yield from node
            for child in node.values():
                yield from keys(child)
        elif isinstance(node, list):
            for child in node:
                yield from keys(child)

    schemas = doc["components"]["schemas"]
    found = set(keys(schemas))
    assert not found & {"ge", "le", "gt", "lt", "x-racm3-limit"}
    seed = non_null(props(doc, "ImageGenerationRequest")["seed"])
    assert seed["minimum"] == 0 and seed["maximum"] >= 2**63 - 1024


def test_bearer_security_is_declared_when_keys_are_configured(client, doc):
    assert doc["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": "one of the server's API keys"}
    for path in PUBLIC_POSTS:
        assert doc["paths"][path]["post"]["security"] == [{"HTTPBearer": []}]
    for path in ("/healthz", "/readyz", "/v1/info"):
        assert "security" not in doc["paths"][path]["get"]
    # Without keys nothing is required, and the document says so.
    app = create_role_app(
        "embedded", gateway_settings=GatewaySettings(), retriever_settings=RetrieverSettings(),
        generator_settings=GeneratorSettings(), engine_factory=lambda s: None,
        backend_factory=lambda s: None,
    )
    open_doc = app.openapi()
    assert "securitySchemes" not in open_doc.get("components", {})
    assert all("security" not in op for item in open_doc["paths"].values()
               for op in item.values())


def test_response_format_is_b64_json_only(client, doc):
    for schema in ("ImageGenerationRequest", "InfillRequest", "Body_edits_v1_images_edits_post"):
        fmt = non_null(props(doc, schema)["response_format"])
        assert fmt.get("const") == "b64_json" or fmt.get("enum") == ["b64_json"], schema
    err = assert_error(client.post(GEN, json={"prompt": "a", "response_format": "url"}), 422,
                       "response_format")
    assert "never hosts files" in err["message"]


def test_the_configured_limits_are_in_the_schema_and_enforced(client, doc):
    info = client.get("/v1/info").json()["limits"]
    gen = props(doc, "ImageGenerationRequest")
    assert gen["n"]["maximum"] == info["max_n"] == 3
    assert non_null(gen["num_candidates"])["maximum"] == info["max_candidates"] == 5
    assert gen["prompt"]["maxLength"] == info["max_prompt_chars"] == 200
    assert non_null(props(doc, "RetrievalOptions")["k"])["maximum"] == info["max_k"] == 4
    cls = props(doc, "ClassifyRequest")
    assert cls["labels"]["maxItems"] == 6 and cls["labels"]["uniqueItems"] is True
    assert cls["examples"]["maxItems"] == 2
    knn = props(doc, "KnnServiceRequest")
    assert knn["num_images"]["maximum"] == non_null(knn["num_result_ids"])["maximum"] == 12
    assert props(doc, "RetrieveRequest")["k"]["maximum"] == 12
    edits = props(doc, "Body_edits_v1_images_edits_post")
    assert edits["n"]["maximum"] == 3 and non_null(edits["retrieval_k"])["maximum"] == 4
    assert "num_candidates must be >= n" not in str(gen)  # said in words, not as a bound
    assert "at least n" in non_null(gen["num_candidates"]).get("description", "") or \
        "at least n" in gen["num_candidates"].get("description", "")

    assert_error(client.post(GEN, json={"prompt": "a", "n": 4}), 422, "n")
    assert_error(client.post(GEN, json={"prompt": "a", "n": 2, "num_candidates": 1}), 422,
                 "num_candidates")
    ok = client.post(GEN, json={"prompt": "a red square", "n": 3, "seed": 1})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 3


@pytest.mark.parametrize("field", ["temperature", "guidance_scale", "top_p"])
def test_booleans_are_not_numbers(client, doc, field):
    assert_error(client.post(GEN, json={"prompt": "a", field: False}), 422, field)
    assert_error(client.post(GEN, json={"prompt": "a", "n": True}), 422, "n")
    # An integer is still a number.
    ok = client.post(GEN, json={"prompt": "a red square", field: 1, "seed": 2})
    assert ok.status_code == 200, ok.text[:300]


def test_knn_rejects_overflowing_embeddings_and_normalises_large_ones(client):
    dim = client.get("/v1/info").json()["memory"]["embedding_dim"]
    for bad in ([1e308] * dim, [3.5e38] + [0.0] * (dim - 1)):
        r = client.post("/knn-service", json={"embedding_input": bad, "num_images": 3})
        assert_error(r, 422, "embedding_input.0")
    large = client.post("/knn-service", json={"embedding_input": [1e30] * dim, "num_images": 3})
    small = client.post("/knn-service", json={"embedding_input": [1.0] * dim, "num_images": 3})
    assert large.status_code == small.status_code == 200
    assert [r["id"] for r in large.json()] == [r["id"] for r in small.json()]
    assert len(large.json()) == 3


def test_knn_limit_error_names_the_parameter_at_fault(client):
    r = client.post("/knn-service", json={"text": "a red square", "num_images": 3,
                                             "num_result_ids": 100000})
    err = assert_error(r, 422, "num_result_ids")
    assert "num_result_ids" in err["message"] and "num_images" not in err["message"]
    r = client.post("/knn-service", json={"text": "a red square", "num_images": 13})
    assert_error(r, 422, "num_images")


def test_info_shows_no_paths_and_no_manifest_notes(client, server, real_models):  # noqa: F811
    text = client.get("/v1/info").text
    assert str(real_models.memory_dir) not in text and str(real_models.bundle_dir) not in text
    assert '"path"' not in text
    info = InfoResponse(
        version="1", role="gateway",
        generator={"image_size": [32, 32], "manifest": {
            "name": "demo", "source_commit": "abc", "source_commit_note": "internal history",
            "notes": "more"}},
        memory={"version": "v1", "path": "/srv/memory/versions/v1"},
    )
    assert info.generator == {"image_size": [32, 32],
                              "manifest": {"name": "demo", "source_commit": "abc"}}
    assert info.memory == {"version": "v1"}
