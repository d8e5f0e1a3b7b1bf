"""The sampler on a FakeClock: reads, errors, hung reads, staleness, callbacks, lifecycle."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest
from structlog.testing import capture_logs

from meltguard.clock import FakeClock
from meltguard.daemon.telemetry.errors import TelemetryError
from meltguard.daemon.telemetry.nvml import open_nvml
from meltguard.daemon.telemetry.sampler import Sampler, TelemetrySnapshot
from meltguard.values import GpuSample
from tests.fakenvml import FakeNvml
from tests.telemetry.helpers import ScriptedSource, gpu


class Recorder:
    def __init__(self) -> None:
        self.snapshots: list[TelemetrySnapshot] = []
        self.ticks: list[float] = []

    def on_snapshot(self, snapshot: TelemetrySnapshot) -> None:
        self.snapshots.append(snapshot)

    def on_tick(self, now: float) -> None:
        self.ticks.append(now)


def make(source: ScriptedSource, clock: FakeClock, **kwargs: float) -> tuple[Sampler, Recorder]:
    recorder = Recorder()
    sampler = Sampler(
        source,
        clock=clock,
        on_snapshot=recorder.on_snapshot,
        on_tick=recorder.on_tick,
        **kwargs,
    )
    return sampler, recorder


async def test_successful_read_updates_latest_and_calls_back() -> None:
    clock = FakeClock(start=10.0)
    source = ScriptedSource([[gpu(0), gpu(1)]], kind="nvml")
    sampler, rec = make(source, clock)
    snapshot = await sampler.tick()
    assert snapshot is not None
    assert snapshot == sampler.latest
    assert snapshot.samples == (gpu(0), gpu(1))
    assert (snapshot.taken_at, snapshot.source) == (10.0, "nvml")
    assert rec.snapshots == [snapshot]
    assert rec.ticks == [10.0]
    assert sampler.error_counts == {}
    # Reads run off the event loop, on the one dedicated reader thread.
    await sampler.tick()
    assert source.threads == {"meltguard-telemetry-nvml"}
    await sampler.stop()
    assert source.closed


async def test_errors_are_counted_and_the_sampler_keeps_going() -> None:
    clock = FakeClock()
    good: list[GpuSample] = [gpu(0)]
    source = ScriptedSource(
        [good, TelemetryError("nvml_unknown"), ZeroDivisionError("bug"), [], good]
    )
    sampler, rec = make(source, clock)
    for _ in range(5):
        await sampler.tick()
        clock.advance(0.5)
    assert sampler.error_counts == {"nvml_unknown": 1, "ZeroDivisionError": 1, "no_samples": 1}
    assert len(rec.snapshots) == 2
    assert len(rec.ticks) == 5  # on_tick runs every interval, failed or not
    await sampler.stop()


async def test_a_failure_streak_logs_once_and_its_end_once() -> None:
    error = TelemetryError("nvml_unknown", "Unknown Error")
    source = ScriptedSource([error, error, error, [gpu(0)], [gpu(0)]])
    sampler, _ = make(source, FakeClock())
    with capture_logs() as logs:
        for _ in range(5):
            await sampler.tick()
    assert [(e["event"], e.get("error"), e.get("after")) for e in logs] == [
        ("telemetry.read_failed", "nvml_unknown", None),
        ("telemetry.recovered", None, "nvml_unknown"),
    ]
    assert sampler.error_counts == {"nvml_unknown": 3}
    await sampler.stop()


async def test_age_and_staleness_follow_the_clock() -> None:
    clock = FakeClock(start=100.0)
    source = ScriptedSource([[gpu(0)], []])
    sampler, rec = make(source, clock, stale_after=5.0)
    clock.advance(3.0)
    # Never read: stale, and the age counts from the sampler's creation.
    assert sampler.is_stale(clock.monotonic())
    assert sampler.age(clock.monotonic()) == 3.0
    await sampler.tick()
    assert not sampler.is_stale(clock.monotonic())
    assert sampler.age(clock.monotonic()) == 0.0
    for _ in range(10):  # an ended replay: reads return nothing, the data ages
        clock.advance(1.0)
        await sampler.tick()
    now = clock.monotonic()
    assert sampler.age(now) == 10.0
    assert sampler.is_stale(now)
    assert rec.ticks[-1] == now
    sampler.set_stale_after(20.0)
    assert not sampler.is_stale(now)
    await sampler.stop()


async def test_a_hung_read_times_out_blocks_no_second_read_and_recovers() -> None:
    clock = FakeClock()
    release = threading.Event()
    calls: list[int] = []

    def hanging() -> Sequence[GpuSample]:
        calls.append(1)
        release.wait(10)
        return [gpu(0, temperature_c=99.0)]

    source = ScriptedSource([hanging, [gpu(0, temperature_c=61.0)]])
    sampler, rec = make(source, clock, read_deadline=0.05)
    try:
        assert await sampler.tick() is None
        assert sampler.error_counts == {"timeout": 1}
        assert sampler.read_in_progress
        clock.advance(0.5)
        assert await sampler.tick() is None
        assert sampler.error_counts == {"timeout": 1, "busy": 1}
        assert len(calls) == 1  # no second read queued behind the stuck one
        assert len(rec.ticks) == 2
    finally:
        release.set()
    clock.advance(0.5)
    snapshot = await sampler.tick()
    # The late result is from the past and is dropped; a fresh read is taken.
    assert snapshot is not None and snapshot.samples[0].temperature_c == 61.0
    assert not sampler.read_in_progress
    await sampler.stop()


async def test_stop_does_not_close_the_source_under_a_stuck_read() -> None:
    release = threading.Event()
    source = ScriptedSource([lambda: [gpu(0)] if release.wait(10) else []])
    sampler, _ = make(source, FakeClock(), read_deadline=0.05)
    await sampler.tick()
    await sampler.stop()
    assert not source.closed
    release.set()


async def test_callbacks_that_raise_do_not_stop_sampling() -> None:
    def boom(_: object) -> None:
        raise RuntimeError("pressure bug")

    source = ScriptedSource([[gpu(0)]])
    sampler = Sampler(source, clock=FakeClock(), on_snapshot=boom, on_tick=boom)
    assert await sampler.tick() is not None
    assert await sampler.tick() is not None
    assert sampler.error_counts == {}
    await sampler.stop()


def test_intervals_and_deadline_defaults() -> None:
    sampler = Sampler(ScriptedSource([[]]), clock=FakeClock(), interval=0.5)
    assert sampler.read_deadline == 1.0
    sampler.set_interval(5.0)
    assert (sampler.interval, sampler.read_deadline) == (5.0, 2.0)
    sampler.set_read_deadline(0.3)
    assert sampler.read_deadline == 0.3
    sampler.set_read_deadline(None)
    assert sampler.read_deadline == 2.0
    with pytest.raises(ValueError, match="interval must be > 0"):
        sampler.set_interval(0)
    with pytest.raises(ValueError, match="stale_after"):
        Sampler(ScriptedSource([[]]), clock=FakeClock(), stale_after=-1)


async def test_background_task_reads_every_interval_on_the_clock() -> None:
    clock = FakeClock(start=0.0)
    source = ScriptedSource([[gpu(0)]])
    sampler, rec = make(source, clock, interval=0.25)
    sampler.start()
    sampler.start()  # idempotent
    for _ in range(500):
        if len(rec.ticks) >= 8:
            break
        await asyncio.sleep(0.005)
    await sampler.stop()
    assert len(rec.ticks) >= 8
    assert rec.ticks[:8] == [0.25 * i for i in range(8)]
    assert source.closed


async def test_interval_change_applies_to_the_next_sleep() -> None:
    clock = FakeClock(start=0.0)
    ticks: list[float] = []
    samplers: list[Sampler] = []

    def slow_down(now: float) -> None:
        ticks.append(now)
        if now >= 2.0:
            samplers[0].set_interval(10.0)

    sampler = Sampler(ScriptedSource([[gpu(0)]]), clock=clock, interval=1.0, on_tick=slow_down)
    samplers.append(sampler)
    sampler.start()
    for _ in range(500):
        if len(ticks) >= 5:
            break
        await asyncio.sleep(0.005)
    await sampler.stop()
    assert ticks[:5] == [0.0, 1.0, 2.0, 12.0, 22.0]


async def test_hanging_nvml_call_times_out_goes_stale_and_recovers(fake_nvml: FakeNvml) -> None:
    clock = FakeClock()
    source = open_nvml(clock=clock, environ={})
    sampler = Sampler(source, clock=clock, interval=0.5, stale_after=2.0, read_deadline=0.1)
    fake_nvml.update({"0.temperature": 70})
    assert await sampler.tick() is not None
    fake_nvml.update({"1.temperature.hang_ms": 30_000})
    for _ in range(6):
        clock.advance(0.5)
        assert await sampler.tick() is None
    assert sampler.error_counts == {"timeout": 1, "busy": 5}
    assert sampler.is_stale(clock.monotonic())
    fake_nvml.update({"1.temperature.hang_ms": None, "0.temperature": 72})
    clock.advance(0.5)
    snapshot = await sampler.tick()
    assert snapshot is not None and snapshot.samples[0].temperature_c == 72.0
    assert not sampler.is_stale(clock.monotonic())
    await sampler.stop()
