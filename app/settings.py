"""Service settings: one pydantic-settings class per role, read from `RACM3_*` variables.

Each class is built lazily by its `get_*_settings()` (cached), never at import time, so
tests and the CLI can set the environment first. List settings accept either JSON
(`["a","b"]`) or a comma-separated string (`a,b`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Role = Literal["embedded", "gateway", "retriever", "generator"]
ROLES: tuple[str, ...] = ("embedded", "gateway", "retriever", "generator")


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


StrList = Annotated[list[str], NoDecode]


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RACM3_", extra="ignore", frozen=True)

    # Bearer keys for inference and admin routes; empty means no authentication. The
    # HTTP clients send the first key to the internal services, which check the same list.
    # `key:mem1+mem2` limits a key to those memories (see app/memories.py).
    api_keys: StrList = Field(default_factory=list)
    log_level: str = "info"
    # Named memories, `name=path,name=path` (the first is the default); None: one memory,
    # `default`, at RACM3_MEMORY_DIR. The gateway and the retriever need the same value.
    memories: str | None = None
    memory_dir: Path = Path("memory")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        keys = _split_list(v)
        if isinstance(keys, list):
            from app.memories import parse_api_key

            for entry in keys:
                parse_api_key(str(entry))  # raises on a malformed memory list
        return keys

    @field_validator("memories")
    @classmethod
    def _check_memories(cls, v: str | None) -> str | None:
        from app.memories import parse_memories

        parse_memories(v, Path("memory"))
        return v

    @property
    def named_memories(self) -> list[tuple[str, Path]]:
        from app.memories import parse_memories

        return parse_memories(self.memories, self.memory_dir)


class RetrieverSettings(_Base):
    """The retriever role: CLIP query encoders, the memory-mapped memory and the cache."""

    bundle_dir: Path = Path("bundles/demo")  # the CLIP query encoders come from the bundle
    # None: an in-process LRU cache. Set, e.g. redis://127.0.0.1:6379/0: a shared cache.
    redis_url: str | None = None
    cache_ttl_s: int = Field(3600, ge=1)
    lru_size: int = Field(10_000, ge=0)
    # A circuit breaker, so a dead Redis costs at most one attempt per `redis_retry_s`
    # instead of one per request. The timeout is generous because a busy CPU here makes
    # a healthy Redis look slow; a single timeout is a miss, several in a row trip.
    redis_timeout_s: float = Field(0.5, gt=0)
    redis_retry_s: float = Field(2.0, gt=0)
    lock_ttl_ms: int = Field(2000, ge=1)
    lock_wait_ms: int = Field(200, ge=0)
    # The paper's retrieval rules (docs/architecture.md, "The method"): K kept of
    # `candidates`, diversity threshold.
    candidates: int = Field(32, ge=1)
    # None: the value the bundle was trained with (its manifest's recipe), else 0.9
    diversity_threshold: float | None = Field(None, gt=0, le=1)
    prefer_multimodal: bool = True
    # The mode a request gets when it names none: "hybrid" (CLIP fused with BM25 over the
    # captions) finds names CLIP never learned; "dense" is the paper's CLIP-only search.
    retrieval_mode: Literal["dense", "hybrid"] = "hybrid"
    search_max_batch_size: int = Field(32, ge=1)
    search_max_wait_ms: float = Field(2.0, ge=0)
    search_queue_size: int = Field(1024, ge=1)
    device: str = "cpu"


class GeneratorSettings(_Base):
    """The generator worker: bundle (tokenizers, VQ, decoder, CLIP reranker) and batching."""

    bundle_dir: Path = Path("bundles/demo")
    device: str | None = None  # None: CUDA when present, else CPU
    max_batch_size: int = Field(8, ge=1)
    max_wait_ms: float = Field(10.0, ge=0)
    # Embedded mode knows which jobs are still being retrieved for: a batch waits for
    # those (and only those) up to this long, enough to cover retrieval's spread.
    max_expected_wait_ms: float = Field(100.0, ge=0)
    queue_size: int = Field(64, ge=1)
    request_timeout_s: float = Field(60.0, gt=0)
    # The decoding fast path (shared prefill, prefix cache, static step); false runs the
    # plain path, which `racm3 bench service` measures it against. None: on CUDA only:
    # on the CPU the plain path measured faster for distinct prompts (BENCHMARKS.md).
    fast_decode: bool | None = None
    # Documents' KV kept across requests (LRU), at most this many bytes; 0 turns it off.
    prefix_cache_bytes: int = Field(128 * 1024 * 1024, ge=0)
    # torch.compile the decode step at warm-up, for the batch shapes the worker runs:
    # "auto" on CUDA (CUDA graphs), not on the CPU, where it measured 1.2-1.3x faster per
    # step but costs minutes of warm-up; "on" on the CPU too (each shape kept compiled
    # where warm-up measured it faster); "off" never.
    decode_compile: Literal["auto", "on", "off"] = "auto"


class GatewaySettings(_Base):
    """The public API: limits, and where the retriever and the generator workers are."""

    retriever_url: str = "http://127.0.0.1:8001"
    generator_urls: StrList = Field(default_factory=lambda: ["http://127.0.0.1:8002"])
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_image_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_image_side: int = Field(4096, ge=1)
    max_prompt_chars: int = Field(1000, ge=1)
    max_n: int = Field(8, ge=1)
    max_candidates: int = Field(32, ge=1)
    max_labels: int = Field(64, ge=1)
    max_examples: int = Field(16, ge=0)
    default_k: int = Field(2, ge=0)  # documents in context, K=2 as in the paper
    max_k: int = Field(16, ge=0)
    max_knn_results: int = Field(100, ge=1)
    request_timeout_s: float = Field(60.0, gt=0)
    # Gateway-side cap on requests in flight; beyond it the gateway answers 429 itself.
    max_inflight: int = Field(256, ge=1)
    retry_after_s: int = Field(1, ge=0)

    @field_validator("generator_urls", mode="before")
    @classmethod
    def _split_urls(cls, v: Any) -> Any:
        return _split_list(v)


@lru_cache
def get_retriever_settings() -> RetrieverSettings:
    return RetrieverSettings()


@lru_cache
def get_generator_settings() -> GeneratorSettings:
    return GeneratorSettings()


@lru_cache
def get_gateway_settings() -> GatewaySettings:
    return GatewaySettings()


def clear_settings_cache() -> None:
    """Forget cached settings (tests that change the environment call this)."""
    for getter in (get_retriever_settings, get_generator_settings, get_gateway_settings):
        getter.cache_clear()
