"""The neighbour cache: query -> neighbour ids and scores.

The key is `racm3:nb:{memory}@{version}:{sha256(canonical query)}:{k}:{strategy hash}`,
so a new memory version never serves stale neighbours, nor one memory another's. Values
are JSON `[[id, score], ...]`; the retriever maps ids back to documents from its own store.

Two backends share `get_or_compute`:
- `RedisNeighbourCache` (redis-py asyncio): `SET key value EX ttl NX` in one command, a
  `SET lock NX PX` lock against stampedes (waiters poll briefly, then compute anyway),
  socket timeouts and a circuit breaker so that a dead Redis costs at most one attempt
  per `retry_s` instead of one per request. Down means "serve without cache". Slow is
  not down: a timeout is a miss for that request, and only `timeouts_to_trip` in a row
  open the breaker, while a refused or dropped connection opens it at once.
- `LruNeighbourCache`: in-process, used when no Redis URL is set.

Identical misses inside one process are coalesced (single flight) in both.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.metrics import Metrics

log = logging.getLogger(__name__)

Hits = list[tuple[int, float]]
Compute = Callable[[], Awaitable[Hits]]

_RELEASE_LOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def cache_key(memory_version: str, canonical_query: bytes, k: int, strategy_hash: str,
              memory: str | None = None) -> str:
    """With `memory`, the version slot is `name@version`: memories whose version names
    coincide (every memory starts at v000001) never share an entry."""
    digest = hashlib.sha256(canonical_query).hexdigest()
    version = memory_version if memory is None else f"{memory}@{memory_version}"
    return f"racm3:nb:{version}:{digest}:{k}:{strategy_hash}"


def encode_hits(hits: Hits) -> str:
    return json.dumps([[int(i), float(s)] for i, s in hits], separators=(",", ":"))


def decode_hits(raw: str | bytes) -> Hits:
    return [(int(i), float(s)) for i, s in json.loads(raw)]


class NeighbourCache:
    backend = "none"

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self._inflight: dict[str, asyncio.Future] = {}

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.cache_requests.labels(self.backend, result).inc()

    async def get_or_compute(self, key: str, compute: Compute) -> tuple[Hits, bool]:
        """(hits, was_cached). Never raises for cache trouble, only for `compute`'s."""
        shared = self._inflight.get(key)
        if shared is not None:
            # Another request in this process is computing the same key: share its result.
            # shield: our cancellation must not cancel the owner's computation.
            try:
                return await asyncio.shield(shared), True
            except asyncio.CancelledError:
                if not shared.cancelled():
                    raise  # we were cancelled ourselves
                # the owner's client went away: compute for ourselves below
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._get_or_compute(key, compute)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # mark retrieved: nobody may be waiting
            raise
        finally:
            self._inflight.pop(key, None)
        future.set_result(result[0])
        return result

    async def _get_or_compute(self, key: str, compute: Compute) -> tuple[Hits, bool]:
        self._count("skipped")
        return await compute(), False

    def status(self) -> str:
        """'ok', or 'degraded: <why>' when the cache is configured but unusable."""
        return "ok"

    async def check(self) -> str:
        return self.status()

    def describe(self) -> dict:
        return {"backend": self.backend, "status": self.status()}

    async def close(self) -> None:
        return None


class LruNeighbourCache(NeighbourCache):
    backend = "memory"

    def __init__(self, capacity: int, ttl_s: float, metrics: Metrics | None = None) -> None:
        super().__init__(metrics)
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, Hits]] = OrderedDict()

    def get(self, key: str) -> Hits | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, hits = item
        if expires < time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return hits

    def put(self, key: str, hits: Hits) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = (time.monotonic() + self.ttl_s, list(hits))
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    async def _get_or_compute(self, key: str, compute: Compute) -> tuple[Hits, bool]:
        hits = self.get(key)
        if hits is not None:
            self._count("hit")
            return hits, True
        self._count("miss")
        hits = await compute()
        self.put(key, hits)
        return hits, False

    def describe(self) -> dict:
        return {**super().describe(), "entries": len(self._items), "capacity": self.capacity}


class RedisNeighbourCache(NeighbourCache):
    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        ttl_s: int,
        timeout_s: float = 0.5,
        retry_s: float = 2.0,
        timeouts_to_trip: int = 3,
        lock_ttl_ms: int = 2000,
        lock_wait_ms: int = 200,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(metrics)
        self.url = url
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.timeouts_to_trip = max(1, timeouts_to_trip)
        self.lock_ttl_ms = lock_ttl_ms
        self.lock_wait_s = lock_wait_ms / 1000.0
        # No retries inside redis-py: the circuit breaker decides when to try again.
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self._open_until = 0.0  # circuit open (Redis skipped) until this monotonic time
        self._last_error: str | None = None
        # Timeouts since the last answer. Not reset by a trip, so that after `retry_s` a
        # Redis that is still hung re-opens the breaker on its first timeout.
        self._timeouts_in_a_row = 0

    # --- circuit breaker ----------------------------------------------------------------

    def _available(self) -> bool:
        return time.monotonic() >= self._open_until

    def _trip(self, exc: BaseException) -> None:
        if self._last_error is None:
            log.warning("redis at %s unavailable (%s); serving without cache", self.url, exc)
        self._last_error = f"{type(exc).__name__}: {exc}"[:200]
        self._open_until = time.monotonic() + self.retry_s
        self._count("error")

    def _timed_out(self, exc: BaseException) -> None:
        """Slow, perhaps only a busy CPU here: a miss now, an outage only if it persists."""
        self._timeouts_in_a_row += 1
        if self._timeouts_in_a_row >= self.timeouts_to_trip:
            self._trip(exc)
        else:
            self._count("timeout")

    def _recovered(self) -> None:
        if self._last_error is not None:
            log.info("redis at %s reachable again; cache resumed", self.url)
        self._last_error = None
        self._timeouts_in_a_row = 0

    async def _call(self, make: Callable[[], Awaitable]) -> tuple[bool, object]:
        """(ok, value). A failure never raises: a timeout counts towards tripping the
        breaker, any other failure (refused, reset, an error answer) trips it."""
        try:
            # The outer bound covers what socket timeouts do not (e.g. DNS, pool waits).
            value = await asyncio.wait_for(make(), self.timeout_s * 4 + 0.05)
        except (RedisTimeoutError, asyncio.TimeoutError) as exc:
            self._timed_out(exc)
            return False, None
        except (RedisError, OSError) as exc:
            self._trip(exc)
            return False, None
        self._recovered()
        return True, value

    # --- cache ----------------------------------------------------------------------------

    async def _get_or_compute(self, key: str, compute: Compute) -> tuple[Hits, bool]:
        if not self._available():
            self._count("skipped")
            return await compute(), False
        ok, raw = await self._call(lambda: self.client.get(key))
        if not ok:
            return await compute(), False
        if raw is not None:
            self._count("hit")
            return decode_hits(raw), True
        self._count("miss")

        token = secrets.token_hex(8)
        lock_key = f"{key}:lock"
        ok, got_lock = await self._call(
            lambda: self.client.set(lock_key, token, nx=True, px=self.lock_ttl_ms)
        )
        if ok and not got_lock:
            cached = await self._wait_for_other(key)
            if cached is not None:
                return cached, True
        try:
            hits = await compute()
            if self._available():
                await self._call(
                    lambda: self.client.set(key, encode_hits(hits), ex=self.ttl_s, nx=True)
                )
        finally:
            if ok and got_lock and self._available():
                await self._call(lambda: self.client.eval(_RELEASE_LOCK, 1, lock_key, token))
        return hits, False

    async def _wait_for_other(self, key: str) -> Hits | None:
        """Another process holds the lock and is computing: poll briefly for its result."""
        deadline = time.monotonic() + self.lock_wait_s
        while time.monotonic() < deadline and self._available():
            await asyncio.sleep(0.005)
            ok, raw = await self._call(lambda: self.client.get(key))
            if ok and raw is not None:
                return decode_hits(raw)
        return None

    def status(self) -> str:
        if self._last_error is not None:
            return f"degraded: redis unavailable ({self._last_error})"
        return "ok"

    async def check(self) -> str:
        """Ping (when the breaker allows) so readiness notices a dead Redis without traffic."""
        if self._available():
            await self._call(self.client.ping)
        return self.status()

    def describe(self) -> dict:
        return {**super().describe(), "url": _redact(self.url), "ttl_s": self.ttl_s}

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except (RedisError, OSError):
            pass


def _redact(url: str) -> str:
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def build_cache(
    redis_url: str | None,
    *,
    ttl_s: int,
    lru_size: int,
    timeout_s: float,
    retry_s: float,
    timeouts_to_trip: int = 3,
    lock_ttl_ms: int,
    lock_wait_ms: int,
    metrics: Metrics | None,
) -> NeighbourCache:
    if redis_url:
        return RedisNeighbourCache(
            redis_url,
            ttl_s=ttl_s,
            timeout_s=timeout_s,
            retry_s=retry_s,
            timeouts_to_trip=timeouts_to_trip,
            lock_ttl_ms=lock_ttl_ms,
            lock_wait_ms=lock_wait_ms,
            metrics=metrics,
        )
    return LruNeighbourCache(lru_size, ttl_s, metrics)
