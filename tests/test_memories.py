"""Several named memories behind one service, isolated per API key: real HTTP, real Redis,
the real memories (copies of the smoke memory, one with documents appended by the real
index builder), and a retriever role reached over HTTP for the multi-service case.

Keys: k1 may use public and team-a, k2 only public, k3 every memory. team-a alone holds
"the flag of Quorvia".
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
import redis

from app.images import png_b64
from app.serve import create_role_app
from app.settings import GatewaySettings
from retrieval import publish as pub
from tests.live import (  # noqa: F401 - fixture
    LiveServer,
    append_documents,
    live_app,
    real_models,
    solid_image,
    wait_ready,
)
from tests.test_api_reload import corrupt_middle_byte

REDIS_URL = "redis://127.0.0.1:6379/0"
KEYS = ["k1:public+team-a", "k2:public", "k3"]
K1, K2, K3 = ({"Authorization": f"Bearer {k}"} for k in ("k1", "k2", "k3"))
SECRET = "the flag of Quorvia"


@pytest.fixture(scope="module")
def memories(real_models, tmp_path_factory):  # noqa: F811 - fixture
    tmp = tmp_path_factory.mktemp("memories")
    public = real_models.copy_memory(tmp / "public")
    team_a = real_models.copy_memory(tmp / "team-a")
    append_documents(real_models, team_a, [SECRET], ["yellow"], tmp / "docs")
    r = redis.Redis.from_url(REDIS_URL)
    for key in r.scan_iter("racm3:nb:public@*"):
        r.delete(key)
    for key in r.scan_iter("racm3:nb:team-a@*"):
        r.delete(key)
    return {"public": public, "team-a": team_a, "tmp": tmp,
            "spec": f"public={public},team-a={team_a}"}


@pytest.fixture(scope="module")
def server(real_models, memories):  # noqa: F811 - fixture
    app = real_models.app(
        gateway={"api_keys": KEYS, "memories": memories["spec"]},
        retriever={"memories": memories["spec"], "redis_url": REDIS_URL},
        generator={"max_wait_ms": 2},
    )
    with live_app(app) as live:
        yield live


def post(server, path: str, body: dict, headers: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


def searches(url: str, memory: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    m = re.search(rf'racm3_memory_searches_total{{memory="{memory}"}} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def captions(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [d["caption"] for d in r.json()["data"]]


def test_a_key_reaches_its_memories_and_the_default_is_its_first(server):
    find = {"text": SECRET, "k": 3, "strategy": "knn"}
    assert SECRET in captions(post(server, "/v1/retrieve", {**find, "memory": "team-a"}, K1))
    assert SECRET not in captions(post(server, "/v1/retrieve", {**find, "memory": "public"}, K1))
    assert SECRET in captions(post(server, "/v1/retrieve", {**find, "memory": "team-a"}, K3))
    by_default = post(server, "/v1/retrieve", find, K2)
    assert by_default.json()["memory"] == "public" and SECRET not in captions(by_default)
    gen = post(server, "/v1/images/generations",
               {"prompt": SECRET, "seed": 1, "return_neighbours": True,
                "retrieval": {"memory": "team-a", "k": 1}}, K1)
    assert gen.status_code == 200 and gen.json()["neighbours"][0]["caption"] == SECRET


@pytest.mark.parametrize("path,body", [
    ("/v1/retrieve", {"text": SECRET, "memory": "{m}"}),
    ("/v1/images/generations", {"prompt": SECRET, "retrieval": {"memory": "{m}"}}),
    ("/v1/images/generations", {"prompt": SECRET, "stream": True,
                                "retrieval": {"memory": "{m}"}}),
    ("/knn-service", {"text": SECRET, "indice_name": "{m}", "num_images": 2}),
    ("/v1/images/captions", {"image": png_b64(solid_image("red")),
                             "retrieval": {"memory": "{m}"}}),
    ("/admin/reload?memory={m}", None),
])
def test_a_forbidden_memory_answers_exactly_as_a_missing_one(server, path, body):
    def ask(name: str) -> httpx.Response:
        url = f"{server.url}{path.replace('{m}', name)}"
        content = None if body is None else json.dumps(body).replace("{m}", name)
        headers = {**K2, "Content-Type": "application/json"}
        return httpx.post(url, content=content, headers=headers, timeout=60)

    before = searches(server.url, "team-a")
    forbidden, missing = ask("team-a"), ask("nope-zz")
    assert forbidden.status_code == missing.status_code == 404
    assert forbidden.json() == {"error": {
        "message": "memory 'team-a' not found", "type": "not_found_error",
        "param": forbidden.json()["error"]["param"], "code": "memory_not_found"}}
    assert forbidden.text.replace("team-a", "nope-zz") == missing.text
    same = ("content-type", "www-authenticate", "retry-after")
    assert [forbidden.headers.get(h) for h in same] == [missing.headers.get(h) for h in same]
    # Refused before anything was searched: no work, hence no timing, tells them apart.
    assert searches(server.url, "team-a") == before


def test_info_shows_a_key_only_its_memories(server, memories):
    def info(headers: dict) -> dict:
        return httpx.get(f"{server.url}/v1/info", headers=headers, timeout=30).json()

    assert set(info(K1)["memories"]) == {"public", "team-a"}
    mine = info(K2)
    assert set(mine["memories"]) == {"public"} and mine["memory"]["name"] == "public"
    assert "team-a" not in str(mine)
    assert mine["memories"]["public"]["documents"] == mine["memory"]["documents"]
    stranger = info({"Authorization": "Bearer wrong"})
    assert stranger.get("memories", {}) == {} and "memory" not in stranger
    assert "team-a" not in str(stranger) and "public" not in str(stranger)
    # /readyz, for probes, names no memory either
    assert "team-a" not in httpx.get(f"{server.url}/readyz").text


def test_cache_and_metrics_are_per_memory(server):
    r = redis.Redis.from_url(REDIS_URL)
    body = {"text": "a small blue square", "k": 2}
    for memory in ("public", "team-a", "team-a"):
        assert post(server, "/v1/retrieve", {**body, "memory": memory}, K1).status_code == 200
    keys = {k.decode().split(":")[2].split("@")[0] for k in r.scan_iter("racm3:nb:*@*")}
    assert {"public", "team-a"} <= keys
    text = httpx.get(f"{server.url}/metrics").text
    hits = {m: float(v) for m, v in re.findall(
        r'racm3_memory_cache_hits_total{memory="([^"]+)"} (\S+)', text)}
    assert hits["team-a"] >= 1
    labels = set(re.findall(r'racm3_memory_searches_total{memory="([^"]+)"}', text))
    assert labels <= {"public", "team-a"}  # never a name a client made up


def test_append_and_reload_change_only_that_memory(server, memories, real_models):  # noqa: F811
    public_before = httpx.get(f"{server.url}/v1/info", headers=K1).json()["memories"]["public"]
    new = append_documents(real_models, memories["team-a"], ["the flag of Zentara"], ["green"],
                           memories["tmp"] / "docs2")
    forbidden = httpx.post(f"{server.url}/admin/reload?memory=team-a", headers=K2)
    assert forbidden.status_code == 404
    r = httpx.post(f"{server.url}/admin/reload?memory=team-a", headers=K1, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["memory"] == "team-a" and r.json()["memory_version"] == new
    after = httpx.get(f"{server.url}/v1/info", headers=K1).json()["memories"]
    assert after["public"] == public_before and after["team-a"]["version"] == new
    find = {"text": "the flag of Zentara", "k": 1, "strategy": "knn"}
    assert captions(post(server, "/v1/retrieve", {**find, "memory": "team-a"}, K1)) == [
        "the flag of Zentara"]
    assert captions(post(server, "/v1/retrieve", {**find, "memory": "public"}, K1)) != [
        "the flag of Zentara"]


def test_a_corrupt_version_in_one_memory_leaves_the_others_serving(server, memories,
                                                                   real_models):  # noqa: F811
    team_a = memories["team-a"]
    serving = pub.current_version(team_a)
    bad = append_documents(real_models, team_a, ["a damaged version"], ["red"],
                           memories["tmp"] / "docs3")
    corrupt_middle_byte(pub.version_dir(team_a, bad) / "store.arrow")
    r = httpx.post(f"{server.url}/admin/reload?memory=team-a", headers=K1, timeout=60)
    assert r.status_code == 409 and f"still serving {serving}" in r.json()["error"]["message"]
    info = httpx.get(f"{server.url}/v1/info", headers=K1).json()["memories"]
    assert info["team-a"]["version"] == serving
    for memory in ("public", "team-a"):
        assert post(server, "/v1/retrieve", {"text": "a red square", "memory": memory},
                    K1).status_code == 200
    pub.set_current(team_a, serving)


def test_a_memory_that_fails_to_load_is_unavailable_alone(real_models, memories, tmp_path):  # noqa: F811
    broken = real_models.copy_memory(tmp_path / "broken")
    corrupt_middle_byte(pub.version_dir(broken, pub.current_version(broken)) / "index.faiss")
    spec = f"public={memories['public']},broken={broken}"
    app = real_models.app(gateway={"memories": spec}, retriever={"memories": spec})
    with live_app(app) as live:
        ready = httpx.get(f"{live.url}/readyz").json()
        assert ready["status"] == "degraded" and "broken" not in str(ready)
        ok = httpx.post(f"{live.url}/v1/retrieve", json={"text": "a red square"}, timeout=60)
        assert ok.status_code == 200 and ok.json()["memory"] == "public"
        down = httpx.post(f"{live.url}/v1/retrieve", timeout=60,
                          json={"text": "a red square", "memory": "broken"})
        assert down.status_code == 503 and down.json()["error"]["code"] == "memory_unavailable"


def test_multi_service_gateway_enforces_keys_over_http(real_models, memories):  # noqa: F811
    spec = memories["spec"]
    retriever = create_role_app("retriever", retriever_settings=real_models.retriever_settings(
        memories=spec, api_keys=KEYS), backend_factory=real_models.backend)
    with LiveServer(retriever) as r:
        wait_ready(r.url)
        gateway = create_role_app("gateway", gateway_settings=GatewaySettings(
            retriever_url=r.url, generator_urls=["http://127.0.0.1:9"], memories=spec,
            api_keys=KEYS))
        with LiveServer(gateway) as gw:
            find = {"text": SECRET, "k": 1, "strategy": "knn", "memory": "team-a"}
            ok = httpx.post(f"{gw.url}/v1/retrieve", json=find, headers=K1, timeout=60)
            assert captions(ok) == [SECRET]
            no = httpx.post(f"{gw.url}/v1/retrieve", json=find, headers=K2, timeout=60)
            missing = httpx.post(f"{gw.url}/v1/retrieve", headers=K2, timeout=60,
                                 json={**find, "memory": "nope-zz"})
            assert no.status_code == missing.status_code == 404
            assert no.text.replace("team-a", "nope-zz") == missing.text
