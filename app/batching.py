"""Dynamic batching in front of a single-threaded engine.

Callers `submit(task, job)` and await the result. One loop takes the oldest waiting job,
then gathers more jobs of the same task until the batch is full or the oldest job has
waited `max_wait_ms`, and runs `run_batch(task, jobs)` on one dedicated thread (the
engine is not thread-safe, and the event loop must stay free to accept requests).

- The queue is bounded: a submit beyond `max_queue` raises `QueueFull` at once (429),
  so overload never turns into unbounded latency. Announced jobs (below) hold their
  place: an announcement beyond what the queue can take raises `QueueFull` itself, so
  the caller refuses before doing any work for the job.
- A job whose caller went away (task cancelled: the client disconnected) or timed out
  is dropped before its batch runs; once its batch runs, `on_cancel(job)` tells the
  runner (the generator sets the job's stop flag, and the engine drops its rows between
  decoding steps). `racm3_jobs_cancelled_total{when=queued|running}` counts each such
  job once.
- Anticipation: a caller that knows a job is on its way (the embedded gateway, while it
  retrieves the job's neighbours) announces it with `expecting(task)`. Once anything has
  been announced, the loop waits only while announced jobs of the batch's task are still
  coming (up to `max_expected_wait_ms`), and runs at once when none are: a lone request
  no longer pays the wait, and concurrent requests whose retrievals finish tens of ms
  apart still share a batch. Without announcements (a worker behind HTTP) the wait is
  blind: `max_wait_ms`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from app.errors import QueueFull, RequestTimeout
from app.metrics import Metrics

log = logging.getLogger(__name__)

J = TypeVar("J")
R = TypeVar("R")
RunBatch = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


@dataclass
class _Pending:
    task: Hashable
    job: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    started: bool = False  # taken into a batch


class Ticket:
    """One announced job (see `DynamicBatcher.expecting`)."""

    def __init__(self, batcher: DynamicBatcher, task: Hashable) -> None:
        self._batcher: DynamicBatcher | None = batcher
        self._task = task

    def arrived(self) -> None:
        """Idempotent: the job is about to be submitted, or will never be."""
        if self._batcher is not None:
            self._batcher._arrived(self._task)
            self._batcher = None


class DynamicBatcher(Generic[J, R]):
    def __init__(
        self,
        name: str,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        max_expected_wait_ms: float | None = None,
        metrics: Metrics | None = None,
        retry_after_s: int = 1,
        on_cancel: Callable[[Any], None] | None = None,
    ) -> None:
        self.name = name
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        # Waiting for an announced job costs nothing when none is announced, so it may be
        # longer than the blind wait: long enough to cover the spread of retrieval times.
        self.max_expected_wait_s = (
            self.max_wait_s if max_expected_wait_ms is None else max_expected_wait_ms / 1000.0
        )
        self.max_queue = max_queue
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self.on_cancel = on_cancel
        self._pending: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.running = 0  # jobs in the batch now executing
        self._expected: Counter[Hashable] = Counter()  # announced jobs, not yet submitted
        self.anticipating = False  # set by the first announcement

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        if self._loop_task is not None:
            return
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-batch")
        self._loop_task = asyncio.create_task(self._loop(), name=f"{self.name}-batcher")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        for item in self._pending:
            if not item.future.done():
                item.future.cancel()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    @property
    def depth(self) -> int:
        return len(self._pending)

    # --- submit ----------------------------------------------------------------------

    @property
    def expected(self) -> int:
        """Announced jobs not submitted yet."""
        return sum(self._expected.values())

    @contextmanager
    def expecting(self, task: Hashable) -> Iterator[Ticket]:
        """Announce a job for `task` that is on its way; `ticket.arrived()` (or leaving the
        block, whichever comes first) says it has been submitted or will not be. Call on
        the event loop the batcher runs on.

        Admission: the announced job holds a place in the queue until it arrives, and an
        announcement the queue has no place for raises `QueueFull` at once."""
        self._prune()
        if len(self._pending) + self.expected >= self.max_queue:
            raise self._full()
        self.anticipating = True
        self._expected[task] += 1
        ticket = Ticket(self, task)
        try:
            yield ticket
        finally:
            ticket.arrived()

    def _arrived(self, task: Hashable) -> None:
        self._expected[task] -= 1
        if self._wakeup is not None:
            self._wakeup.set()  # the loop may be waiting for exactly this job

    async def submit(self, task: Hashable, job: J, timeout_s: float | None = None) -> R:
        if self._loop_task is None or self._wakeup is None:
            raise RuntimeError(f"batcher {self.name} is not started")
        self._prune()
        if len(self._pending) >= self.max_queue:
            raise self._full()
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        pending = _Pending(task, job, future)
        self._pending.append(pending)
        self._set_depth()
        self._wakeup.set()
        try:
            # wait_for cancels `future` on timeout or when this caller is cancelled, which
            # is exactly what marks the job as abandoned for the loop.
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"{self.name}: no result within {timeout_s:g} s", code="timeout"
            ) from None
        finally:
            if future.cancelled():
                if self.metrics is not None:
                    when = "running" if pending.started else "queued"
                    self.metrics.cancelled.labels(self.name, when).inc()
                if pending.started and self.on_cancel is not None:
                    self.on_cancel(job)

    def _full(self) -> QueueFull:
        return QueueFull(
            f"{self.name} queue is full ({self.max_queue} waiting); retry later",
            retry_after_s=self.retry_after_s,
        )

    # --- loop ------------------------------------------------------------------------

    def _prune(self) -> None:
        if any(p.future.done() for p in self._pending):
            self._pending = deque(p for p in self._pending if not p.future.done())
            self._set_depth()

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.name).set(len(self._pending))

    def _count(self, task: Hashable) -> int:
        return sum(1 for p in self._pending if p.task == task and not p.future.done())

    async def _loop(self) -> None:
        assert self._wakeup is not None
        while True:
            self._prune()
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self._pending[0]
            await self._gather(first)
            batch = self._take(first.task)
            if batch:
                await self._run(first.task, batch)

    async def _gather(self, first: _Pending) -> None:
        """Wait while more jobs of `first`'s task may join its batch.

        Blind (nothing ever announced): until the batch is full or `first` has waited
        `max_wait_ms`. Anticipating: only while announced jobs of the task are still on
        their way, up to `max_expected_wait_ms` after `first` queued; a job with nothing
        else coming runs at once.
        """
        assert self._wakeup is not None
        while self._count(first.task) < self.max_batch_size and not first.future.done():
            if self.anticipating:
                if self._expected[first.task] <= 0:
                    return  # nothing else is on its way: waiting would only add latency
                deadline = first.enqueued + self.max_expected_wait_s
            else:
                deadline = first.enqueued + self.max_wait_s
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self, task: Hashable) -> list[_Pending]:
        batch: list[_Pending] = []
        rest: deque[_Pending] = deque()
        for p in self._pending:
            if p.future.done():
                continue
            if p.task == task and len(batch) < self.max_batch_size:
                batch.append(p)
            else:
                rest.append(p)
        self._pending = rest
        self._set_depth()
        return batch

    async def _run(self, task: Hashable, batch: list[_Pending]) -> None:
        batch = [p for p in batch if not p.future.done()]  # left while the batch formed
        if not batch:
            return
        for p in batch:
            p.started = True
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.batch_size.labels(self.name).observe(len(batch))
            for p in batch:
                self.metrics.stage_latency.labels(f"{self.name}_queue_wait").observe(
                    now - p.enqueued
                )
        self.running = len(batch)
        jobs = [p.job for p in batch]
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self.run_batch, task, jobs)
            if len(results) != len(batch):
                raise RuntimeError(
                    f"{self.name}: run_batch returned {len(results)} results for {len(batch)} jobs"
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if len(batch) == 1:
                self._fail(batch[0], exc)
                return
            # One job can break the whole batch (an input the engine cannot take): run each
            # job alone, so only the job at fault fails and the others complete.
            log.warning("%s batch of %d failed (%s: %s); running its jobs one by one",
                        self.name, len(batch), type(exc).__name__, exc)
            await self._run_alone(task, batch, loop)
            return
        finally:
            self.running = 0
            if self.metrics is not None:
                self.metrics.stage_latency.labels(f"{self.name}_batch").observe(
                    time.perf_counter() - now
                )
        for p, result in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)

    async def _run_alone(self, task: Hashable, batch: list[_Pending], loop: Any) -> None:
        for p in batch:
            if p.future.done():  # its client left meanwhile
                continue
            try:
                (result,) = await loop.run_in_executor(
                    self._executor, self.run_batch, task, [p.job])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._fail(p, exc)
            else:
                if not p.future.done():
                    p.future.set_result(result)

    def _fail(self, p: _Pending, exc: Exception) -> None:
        # One line, not a traceback per job: the error handler logs the request's id.
        log.error("%s job failed: %s: %s", self.name, type(exc).__name__, exc)
        if not p.future.done():
            p.future.set_exception(exc)
