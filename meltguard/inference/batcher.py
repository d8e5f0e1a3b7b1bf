"""One queue in front of one accelerator, shared by every engine.

A single worker drains the queue, so batches run strictly one at a time: that is what a
GPU does anyway, and it keeps a stateful diffusers scheduler from being entered twice.
Waiting jobs with the same `batch_key()` (size and steps) share one pipeline call.

`max_batch` counts images (the sum of `job.n`), not jobs: memory and time grow with the
images in the call, so four n=4 jobs are not "a batch of four". A job whose n alone
exceeds max_batch still runs, alone, rather than being refused here; limiting n is
admission's job. No artificial delay is added to wait for a fuller batch: whatever queued
up while the previous batch ran is what batches (TGI-style), so an idle engine adds no
latency and a busy one batches naturally.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from meltguard.inference.errors import EngineFailure, EngineOutOfMemory
from meltguard.protocols import Clock
from meltguard.values import GenerationJob

log = structlog.get_logger("meltguard.inference")

# Async so the simulator can sleep on its Clock; a blocking pipeline wraps itself with
# loop.run_in_executor on its own single-thread executor (see diffusers_engine).
BatchRunner = Callable[[Sequence[GenerationJob]], Awaitable[list[list[bytes]]]]
# Told of every batch once it ended, with its jobs and its start and end on the Clock.
BatchListener = Callable[[Sequence[GenerationJob], float, float], None]


class _LostResults(EngineFailure):
    """The runner returned fewer or more results than jobs."""


@dataclass(slots=True, eq=False)
class _Waiter:
    job: GenerationJob
    future: asyncio.Future[list[bytes]]


class Batcher:
    def __init__(self, run_batch: BatchRunner, *, max_batch: int, clock: Clock) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._run_batch = run_batch
        self._max_images = max_batch
        self._clock = clock
        self._queue: deque[_Waiter] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._busy_total = 0.0
        self._busy_since: float | None = None
        self._listeners: list[BatchListener] = []

    @property
    def max_batch(self) -> int:
        return self._max_images

    def queued(self) -> int:
        """Jobs waiting for a batch (not counting the one running)."""
        return sum(1 for waiter in self._queue if not waiter.future.done())

    def busy_seconds(self) -> float:
        """Cumulative Clock seconds spent inside run_batch, including the batch running now,
        so a sampler polling faster than a batch lasts still sees the accelerator busy."""
        running = 0.0
        if self._busy_since is not None:
            running = max(self._clock.monotonic() - self._busy_since, 0.0)
        return self._busy_total + running

    def add_listener(self, listener: BatchListener) -> None:
        """Call `listener` after every batch, before its jobs' results are handed back."""
        self._listeners.append(listener)

    async def submit(self, job: GenerationJob) -> list[bytes]:
        if self._closed:
            raise EngineFailure("engine is closed")
        waiter = _Waiter(job, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        self._ensure_worker().set()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            # The client left. Cancelling our await also cancelled the future, which the
            # worker skips; removing it now keeps queued() honest. A batch that already
            # started finishes for its other jobs and this result is thrown away.
            with contextlib.suppress(ValueError):
                self._queue.remove(waiter)
            raise

    async def close(self) -> None:
        """Stop the worker; jobs still queued fail with EngineFailure. The daemon drains
        in-flight work before calling this, so a batch cut short here is a forced stop."""
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(EngineFailure("engine closed before this job ran"))

    def _ensure_worker(self) -> asyncio.Event:
        """Start the worker on first use: it needs the running loop, which a constructor
        called from synchronous wiring code does not have."""
        if self._worker is None or self._worker.done() or self._wakeup is None:
            wakeup = self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(
                self._work(wakeup), name="meltguard-engine-batcher"
            )
        return self._wakeup

    async def _work(self, wakeup: asyncio.Event) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                wakeup.clear()
                await wakeup.wait()
                continue
            await self._run(batch)

    def _take_batch(self) -> list[_Waiter]:
        """The oldest live job plus every later compatible job that still fits.

        The head is always the oldest job, so a job skipped for not fitting becomes a head
        itself once the jobs before it ran: nothing starves, and jobs with other keys keep
        their FIFO turn.
        """
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()
        if not self._queue:
            return []
        head = self._queue.popleft()
        key = head.job.batch_key()
        images = head.job.n
        batch = [head]
        rest: deque[_Waiter] = deque()
        for waiter in self._queue:
            if waiter.future.done():
                continue
            if waiter.job.batch_key() == key and images + waiter.job.n <= self._max_images:
                batch.append(waiter)
                images += waiter.job.n
            else:
                rest.append(waiter)
        self._queue = rest
        return batch

    async def _run(self, batch: list[_Waiter]) -> None:
        started = self._clock.monotonic()
        self._busy_since = started
        try:
            results = await self._run_batch([waiter.job for waiter in batch])
            if len(results) != len(batch):
                # An engine bug, not a bad job: running jobs alone would only hide it.
                raise _LostResults(
                    f"engine returned {len(results)} results for a batch of {len(batch)} jobs"
                )
        except asyncio.CancelledError:
            for waiter in batch:
                if not waiter.future.done():
                    waiter.future.set_exception(EngineFailure("engine closed during generation"))
            raise
        except (EngineOutOfMemory, _LostResults) as exc:
            # Memory ran out for the batch as a whole: every job shares that failure, and the
            # gate backs off its concurrency instead of this loop retrying into the same wall.
            for waiter in batch:
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(exc)
            else:
                # One bad job must not fail the strangers batched with it: run each alone.
                try:
                    for waiter in batch:
                        await self._run_alone(waiter)
                except asyncio.CancelledError:
                    for waiter in batch:
                        if not waiter.future.done():
                            waiter.future.set_exception(
                                EngineFailure("engine closed during generation"))
                    raise
        else:
            for waiter, images in zip(batch, results, strict=True):
                if not waiter.future.done():
                    waiter.future.set_result(images)
        finally:
            ended = self._clock.monotonic()
            self._busy_total += max(ended - started, 0.0)
            self._busy_since = None
            self._tell(batch, started, ended)

    def _tell(self, batch: list[_Waiter], started: float, ended: float) -> None:
        jobs = [waiter.job for waiter in batch]
        for listener in self._listeners:
            try:
                listener(jobs, started, ended)
            except Exception:  # an observer's bug must not fail the batch it watched
                log.exception("batcher.listener_failed")

    async def _run_alone(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        try:
            results = await self._run_batch([waiter.job])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not waiter.future.done():
                waiter.future.set_exception(exc)
        else:
            if waiter.future.done():
                return
            if len(results) == 1:
                waiter.future.set_result(results[0])
            else:
                waiter.future.set_exception(_LostResults(
                    f"engine returned {len(results)} results for a batch of 1 job"))
