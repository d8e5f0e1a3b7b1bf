"""Batch listeners: told of every batch, its jobs and its Clock start and end."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from structlog.testing import capture_logs

from meltguard.clock import FakeClock
from meltguard.inference.batcher import Batcher
from meltguard.inference.errors import EngineOutOfMemory
from meltguard.values import GenerationJob, Size


def job(seed: int) -> GenerationJob:
    return GenerationJob(prompt="p", size=Size(64, 64), steps=2, n=1, seed=seed)


class Runner:
    def __init__(self, clock: FakeClock, fail: Exception | None = None) -> None:
        self.clock = clock
        self.fail = fail

    async def __call__(self, jobs: Sequence[GenerationJob]) -> list[list[bytes]]:
        await self.clock.sleep(2.0)
        if self.fail is not None:
            raise self.fail
        return [[b"png"] for _ in jobs]


async def test_listener_hears_each_batch_with_its_jobs_and_times() -> None:
    clock = FakeClock(start=100.0)
    batcher = Batcher(Runner(clock), max_batch=4, clock=clock)
    heard: list[tuple[list[int], float, float]] = []
    batcher.add_listener(lambda jobs, a, b: heard.append(([j.seed for j in jobs], a, b)))
    await asyncio.gather(batcher.submit(job(1)), batcher.submit(job(2)))
    await batcher.submit(job(3))
    assert heard == [([1, 2], 100.0, 102.0), ([3], 102.0, 104.0)]
    await batcher.close()


async def test_a_failed_batch_is_heard_too() -> None:
    clock = FakeClock(start=0.0)
    batcher = Batcher(Runner(clock, EngineOutOfMemory("oom")), max_batch=4, clock=clock)
    heard: list[float] = []
    batcher.add_listener(lambda jobs, a, b: heard.append(b - a))
    with pytest.raises(EngineOutOfMemory):
        await batcher.submit(job(1))
    assert heard == [2.0]
    await batcher.close()


async def test_a_listener_that_raises_does_not_fail_the_batch() -> None:
    clock = FakeClock(start=0.0)
    batcher = Batcher(Runner(clock), max_batch=4, clock=clock)

    def broken(jobs: Sequence[GenerationJob], started: float, ended: float) -> None:
        raise RuntimeError("listener bug")

    batcher.add_listener(broken)
    with capture_logs() as logs:
        assert await batcher.submit(job(1)) == [b"png"]
    assert [entry["event"] for entry in logs] == ["batcher.listener_failed"]
    await batcher.close()
