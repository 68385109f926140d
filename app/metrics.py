"""Prometheus metrics, on a registry of our own (one per app), never the global one.

A process may hold several apps (tests, embedded mode), so each app gets its own
`Metrics`; nothing here wipes or reuses `prometheus_client.REGISTRY`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.stage_latency = Histogram(
            "racm3_stage_latency_seconds",
            "Latency of one pipeline stage (query encoding, knn search, generation...).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "racm3_request_latency_seconds",
            "End-to-end latency of an HTTP request, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "racm3_requests_total", "HTTP requests by route and status.", ["route", "status"],
            registry=r,
        )
        self.errors = Counter(
            "racm3_errors_total", "Error responses by error type.", ["type"], registry=r
        )
        self.queue_depth = Gauge(
            "racm3_queue_depth", "Jobs waiting in a batching queue.", ["queue"], registry=r
        )
        self.batch_size = Histogram(
            "racm3_batch_size", "Jobs per executed batch.", ["queue"], buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.tokens_generated = Counter(
            "racm3_tokens_generated_total", "Tokens sampled by the decoder.", registry=r
        )
        self.cache_requests = Counter(
            "racm3_cache_requests_total",
            "Neighbour cache look-ups by result: hit, miss, skipped (no cache, or the breaker is "
            "open), timeout (Redis slow: served without it), error (Redis down: breaker opened).",
            ["backend", "result"],
            registry=r,
        )
        # Labelled by configured memory names only (a request naming another is refused
        # before it counts), so the label set is as small as the configuration.
        self.memory_searches = Counter(
            "racm3_memory_searches_total", "Neighbour searches (queries) by memory.",
            ["memory"], registry=r,
        )
        self.memory_cache_hits = Counter(
            "racm3_memory_cache_hits_total", "Queries answered from the neighbour cache, by "
            "memory.", ["memory"], registry=r,
        )
        self.cancelled = Counter(
            "racm3_jobs_cancelled_total",
            "Jobs whose client went away or that timed out, once each: when=queued, dropped "
            "before their batch ran; when=running, their rows left the running batch.",
            ["queue", "when"],
            registry=r,
        )

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_latency.labels(name).observe(time.perf_counter() - start)

    def watch_prefix_cache(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        """Export the decoder's prefix KV cache, read from `stats()` at each scrape."""
        self.registry.register(PrefixCacheCollector(stats))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class PrefixCacheCollector(Collector):
    """The engine owns the cache's counters; a scrape reads them, so nothing is copied
    into prometheus objects on the decoding path."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = (self.stats() or {}).get("prefix_cache")
        if not s:
            return
        for name, doc, key in (
            ("hits", "Prompt segments (documents, prompts) whose KV came from the cache.",
             "hits"),
            ("misses", "Prompt segments that had to be prefilled.", "misses"),
            ("hit_tokens", "Prompt tokens whose prefill the cache saved.", "hit_tokens"),
            ("miss_tokens", "Prompt tokens prefilled.", "miss_tokens"),
            ("evictions", "Entries evicted to stay within the byte bound.", "evictions"),
        ):
            yield CounterMetricFamily(f"racm3_prefix_cache_{name}", doc, value=s[key])
        yield GaugeMetricFamily("racm3_prefix_cache_bytes", "Bytes of KV held.",
                                value=s["bytes"])
        yield GaugeMetricFamily("racm3_prefix_cache_max_bytes", "The cache's byte bound.",
                                value=s["max_bytes"])
        yield GaugeMetricFamily("racm3_prefix_cache_entries", "Segments held.",
                                value=s["entries"])


class RequestMetricsMiddleware:
    """Latency and count per route template (never the raw path: scans would explode it)."""

    def __init__(self, app, metrics: Metrics) -> None:  # noqa: ANN001 - any ASGI app
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.request_latency.labels(name).observe(time.perf_counter() - start)
            self.metrics.requests.labels(name, str(status["code"])).inc()
