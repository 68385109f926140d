"""Named memories and key limits from configuration (`RACM3_MEMORIES`, `RACM3_API_KEYS`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.memories import MemoryAccess, MemoryNotFound, bare_key, parse_api_key, parse_memories
from app.settings import GatewaySettings, RetrieverSettings


def test_memories_parse_in_order_and_default_to_one_named_default():
    assert parse_memories("public=memories/public, team-a=/srv/a", Path("m")) == [
        ("public", Path("memories/public")), ("team-a", Path("/srv/a"))]
    assert parse_memories(None, Path("memory")) == [("default", Path("memory"))]
    assert RetrieverSettings(memory_dir=Path("x")).named_memories == [("default", Path("x"))]


@pytest.mark.parametrize("value", ["public", "a=x,a=y", "bad name=x", "=x", ",", "a:b=x"])
def test_bad_memory_lists_are_refused_at_start(value):
    with pytest.raises(ValidationError):
        GatewaySettings(memories=value)


def test_api_keys_with_and_without_memory_lists():
    assert parse_api_key("k1:public+team-a").memories == frozenset({"public", "team-a"})
    assert parse_api_key("k3").memories is None
    assert bare_key("k1:public+team-a") == "k1"
    with pytest.raises(ValidationError):
        GatewaySettings(api_keys="k1:pub lic")


def test_resolution_hides_forbidden_memories_behind_not_found():
    access = MemoryAccess(["public", "team-a", "team-b"])
    k2 = frozenset({"public"})
    assert access.resolve(None, None, "p") == "public"
    assert access.resolve(None, frozenset({"team-b"}), "p") == "team-b"  # the key's first
    assert access.resolve("team-a", None, "p") == "team-a"
    errors = []
    for name in ("team-a", "nope"):
        with pytest.raises(MemoryNotFound) as caught:
            access.resolve(name, k2, "retrieval.memory")
        errors.append(caught.value)
    bodies = [e.body() for e in errors]
    assert bodies[0]["error"]["message"].replace("team-a", "nope") == \
        bodies[1]["error"]["message"]
    assert bodies[0]["error"] | {"message": ""} == bodies[1]["error"] | {"message": ""}
    assert errors[0].status_code == 404
    assert access.visible(k2) == ["public"] and access.visible(frozenset()) == []
