"""The sampler: reads the telemetry source on a schedule, off the event loop, and never dies.

Reads run on ONE dedicated daemon thread. NVML calls can block for seconds when a card is falling
off the bus; a thread pool would pile up stuck reads, and concurrent.futures' threads are joined
at interpreter exit, so one hung driver call would also hang shutdown. A daemon thread does not.

Each tick:
1. if the previous read is still stuck, wait up to the deadline for it; still stuck -> count
   `busy` and skip (a second read would queue behind the first on the one thread anyway);
2. start a read and wait up to the deadline; not back -> count `timeout` and leave it running;
   TelemetryError -> count its name; any other exception -> count its class name;
   no samples -> count `no_samples` (an ended replay, a box with no GPUs: telemetry goes stale);
3. on success store `latest` and call `on_snapshot`; in every case call `on_tick(now)`, so the
   pressure logic can notice staleness even when no read succeeds.

The deadline is real time (the read blocks in real time) while the schedule and all ages use
the injected Clock, so tests drive ticks with a FakeClock and only a hung read costs wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from meltguard.daemon.telemetry.errors import TelemetryError
from meltguard.protocols import Clock, TelemetrySource
from meltguard.values import GpuSample

log = structlog.get_logger(__name__)

_MAX_DEFAULT_DEADLINE = 2.0


@dataclass(frozen=True, slots=True)
class TelemetrySnapshot:
    """The result of one successful read."""

    samples: tuple[GpuSample, ...]
    taken_at: float  # monotonic seconds on the sampler's clock, when the read returned
    source: str  # the source's kind: nvml, simulated, replay


class _ReaderThread:
    """A single-thread executor whose thread is a daemon, so a hung call cannot block exit."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], Any], asyncio.AbstractEventLoop, asyncio.Future[Any]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((fn, loop, future))
        return future

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, loop, future = job
            try:
                result = fn()
            except BaseException as exc:  # handed to the awaiting side, never lost
                self._settle(loop, future, None, exc)
            else:
                self._settle(loop, future, result, None)

    @staticmethod
    def _settle(
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        result: Any,
        exc: BaseException | None,
    ) -> None:
        def settle() -> None:
            if future.done():
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)

        # RuntimeError: the loop closed while the read was stuck; nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle)


class Sampler:
    def __init__(
        self,
        source: TelemetrySource,
        *,
        clock: Clock,
        interval: float = 0.5,
        stale_after: float = 5.0,
        read_deadline: float | None = None,
        on_snapshot: Callable[[TelemetrySnapshot], None] | None = None,
        on_tick: Callable[[float], None] | None = None,
    ) -> None:
        self._source = source
        self._clock = clock
        self._interval = _positive("interval", interval)
        self._stale_after = _positive("stale_after", stale_after)
        self._deadline: float | None = None
        self.set_read_deadline(read_deadline)
        self._on_snapshot = on_snapshot
        self._on_tick = on_tick
        self._errors: Counter[str] = Counter()
        self._latest: TelemetrySnapshot | None = None
        self._created_at = clock.monotonic()
        self._reader: _ReaderThread | None = None
        self._stuck: asyncio.Future[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._source_closed = False
        self._failing: str | None = None  # the error of the current failure streak, for logging

    # ---- configuration (the policy file sets these; reload changes them live) ----

    @property
    def source(self) -> TelemetrySource:
        return self._source

    @property
    def interval(self) -> float:
        return self._interval

    @property
    def stale_after(self) -> float:
        return self._stale_after

    @property
    def read_deadline(self) -> float:
        if self._deadline is not None:
            return self._deadline
        return min(self._interval * 2, _MAX_DEFAULT_DEADLINE)

    def set_interval(self, seconds: float) -> None:
        self._interval = _positive("interval", seconds)

    def set_stale_after(self, seconds: float) -> None:
        self._stale_after = _positive("stale_after", seconds)

    def set_read_deadline(self, seconds: float | None) -> None:
        """None goes back to the default, min(2 × interval, 2 s)."""
        self._deadline = None if seconds is None else _positive("read_deadline", seconds)

    # ---- state ----

    @property
    def latest(self) -> TelemetrySnapshot | None:
        return self._latest

    @property
    def error_counts(self) -> Mapping[str, int]:
        return dict(self._errors)

    @property
    def read_in_progress(self) -> bool:
        return self._stuck is not None and not self._stuck.done()

    def age(self, now: float) -> float:
        """Seconds since the newest successful read; before any, seconds since the sampler was
        made, so `telemetry_age_seconds` grows (and alerts fire) when telemetry never arrives."""
        since = self._latest.taken_at if self._latest is not None else self._created_at
        return max(now - since, 0.0)

    def is_stale(self, now: float) -> bool:
        return self._latest is None or self.age(now) > self._stale_after

    # ---- running ----

    def start(self) -> None:
        """Start the background task on the running loop; the first read happens at once."""
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="telemetry-sampler")

    async def stop(self, *, close_source: bool = True) -> None:
        """Stop sampling; with `close_source`, close the source on the reader thread unless a read
        is stuck there (closing NVML under a hung call is how drivers crash)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if close_source and not self._source_closed:
            await self._close_source()
        if self._reader is not None:
            self._reader.stop()
            self._reader = None

    async def _close_source(self) -> None:
        if self._stuck is not None:
            # Usually a read that stop() interrupted and that finishes in microseconds.
            await asyncio.wait({self._stuck}, timeout=self.read_deadline)
            if not self._stuck.done():
                log.warning("telemetry.close_skipped", reason="a read is still stuck")
                return
        self._source_closed = True
        if self._reader is None:
            self._source.close()
            return
        closing = self._reader.submit(self._source.close)
        done, _ = await asyncio.wait({closing}, timeout=self.read_deadline)
        if not done:
            log.warning("telemetry.close_timeout", deadline_s=self.read_deadline)
        elif closing.exception() is not None:
            log.warning("telemetry.close_failed", error=repr(closing.exception()))

    async def _run(self) -> None:
        while True:
            await self.tick()
            await self._clock.sleep(self._interval)

    async def tick(self) -> TelemetrySnapshot | None:
        """One sampling step (what the background task does every interval); returns the new
        snapshot or None. Tests call it directly with a FakeClock."""
        snapshot: TelemetrySnapshot | None = None
        try:
            snapshot = await self._read_once()
        except Exception as exc:  # the sampler never dies
            self._count(type(exc).__name__)
            log.exception("telemetry.sampler_bug")
        self._call(self._on_tick, self._clock.monotonic(), "on_tick")
        return snapshot

    async def _read_once(self) -> TelemetrySnapshot | None:
        if self._reader is None:
            self._reader = _ReaderThread(f"meltguard-telemetry-{self._source.kind}")
        deadline = self.read_deadline
        if self._stuck is not None:
            done, _ = await asyncio.wait({self._stuck}, timeout=deadline)
            if not done:
                self._fail("busy")
                return None
            # The late read's result is from the past; drop it (its error was counted as timeout).
            self._stuck.exception()
            self._stuck = None
        future = self._reader.submit(self._source.read)
        try:
            done, _ = await asyncio.wait({future}, timeout=deadline)
        except asyncio.CancelledError:
            # Still running on the thread: stop() must not close the source under it.
            self._mark_stuck(future)
            raise
        if not done:
            self._mark_stuck(future)
            self._fail("timeout", f"no answer within {deadline:g} s")
            return None
        exc = future.exception()
        if isinstance(exc, TelemetryError):
            self._fail(exc.name, exc.detail)
            return None
        if exc is not None:
            self._fail(type(exc).__name__, repr(exc))
            return None
        samples: Sequence[GpuSample] = future.result()
        if not samples:
            self._fail("no_samples", "the source returned no GPUs")
            return None
        if self._failing is not None:
            log.info("telemetry.recovered", source=self._source.kind, after=self._failing)
            self._failing = None
        snapshot = TelemetrySnapshot(
            samples=tuple(samples), taken_at=self._clock.monotonic(), source=self._source.kind
        )
        self._latest = snapshot
        self._call(self._on_snapshot, snapshot, "on_snapshot")
        return snapshot

    def _mark_stuck(self, future: asyncio.Future[Any]) -> None:
        self._stuck = future
        # Retrieve a late failure so asyncio does not log "exception was never retrieved".
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _count(self, name: str) -> None:
        self._errors[name] += 1

    def _fail(self, name: str, detail: str = "") -> None:
        self._count(name)
        # One line when a failure streak starts or changes kind, not one per interval: the
        # counter carries the rate, the log the story.
        if name != self._failing and not (name == "busy" and self._failing == "timeout"):
            log.warning(
                "telemetry.read_failed", source=self._source.kind, error=name, detail=detail
            )
            self._failing = name

    @staticmethod
    def _call(callback: Callable[[Any], None] | None, arg: Any, what: str) -> None:
        if callback is None:
            return
        try:
            callback(arg)
        except Exception:
            # A bug in pressure assessment must not stop telemetry; the log carries the trace.
            log.exception("telemetry.callback_failed", callback=what)


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be > 0 seconds, got {value}")
    return float(value)
