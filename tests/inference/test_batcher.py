from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meltguard.clock import FakeClock
from meltguard.inference.batcher import Batcher
from meltguard.inference.errors import EngineFailure, EngineOutOfMemory
from meltguard.values import GenerationJob, Size

SMALL = Size(64, 64)


def job(seed: int, *, n: int = 1, size: Size = SMALL, steps: int = 2) -> GenerationJob:
    return GenerationJob(prompt=f"p{seed}", size=size, steps=steps, n=n, seed=seed)


class Recorder:
    """A runner that records every batch. While `hold` is set, the first batch waits on
    `release`, so the jobs submitted meanwhile have to queue up behind it."""

    def __init__(self, clock: FakeClock, seconds: float = 1.0, hold: bool = False) -> None:
        self.batches: list[list[GenerationJob]] = []
        self.clock = clock
        self.seconds = seconds
        self.hold = hold
        self.release = asyncio.Event()
        self.fail_with: Exception | None = None

    async def __call__(self, jobs: Sequence[GenerationJob]) -> list[list[bytes]]:
        self.batches.append(list(jobs))
        if self.hold and len(self.batches) == 1:
            await self.release.wait()
        await self.clock.sleep(self.seconds)
        if self.fail_with is not None:
            raise self.fail_with
        return [[f"{j.seed}:{i}".encode() for i in range(j.n)] for j in jobs]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def start_blocker(batcher: Batcher, recorder: Recorder) -> asyncio.Task[list[bytes]]:
    """A first job, held inside the runner, so that what is submitted next queues."""
    first = asyncio.create_task(batcher.submit(job(999, size=Size(8, 8))))
    await settle()
    assert len(recorder.batches) == 1
    return first


def batch_images(batch: list[GenerationJob]) -> int:
    return sum(j.n for j in batch)


async def test_compatible_jobs_share_one_call() -> None:
    clock = FakeClock()
    recorder = Recorder(clock, hold=True)
    batcher = Batcher(recorder, max_batch=4, clock=clock)
    first = await start_blocker(batcher, recorder)
    tasks = [asyncio.create_task(batcher.submit(job(seed))) for seed in range(4)]
    await settle()
    assert batcher.queued() == 4

    recorder.release.set()
    results = await asyncio.gather(first, *tasks)

    assert [len(b) for b in recorder.batches] == [1, 4]
    assert results[1:] == [[f"{seed}:0".encode()] for seed in range(4)]
    await batcher.close()


async def test_incompatible_jobs_run_apart_and_in_arrival_order() -> None:
    clock = FakeClock()
    recorder = Recorder(clock, hold=True)
    batcher = Batcher(recorder, max_batch=8, clock=clock)
    first = await start_blocker(batcher, recorder)
    jobs = [
        job(1),
        job(2, size=Size(128, 64)),
        job(3),
        job(4, steps=4),
        job(5, size=Size(128, 64)),
    ]
    tasks = [asyncio.create_task(batcher.submit(j)) for j in jobs]
    await settle()

    recorder.release.set()
    await asyncio.gather(first, *tasks)

    assert [[j.seed for j in b] for b in recorder.batches[1:]] == [[1, 3], [2, 5], [4]]
    for batch in recorder.batches:
        assert len({j.batch_key() for j in batch}) == 1
    await batcher.close()


async def test_max_batch_counts_images_not_jobs() -> None:
    clock = FakeClock()
    recorder = Recorder(clock, hold=True)
    batcher = Batcher(recorder, max_batch=4, clock=clock)
    first = await start_blocker(batcher, recorder)
    jobs = [job(1, n=2), job(2, n=3), job(3, n=2), job(4, n=1), job(5, n=6)]
    tasks = [asyncio.create_task(batcher.submit(j)) for j in jobs]
    await settle()

    recorder.release.set()
    results = await asyncio.gather(first, *tasks)

    # 1 (n=2) takes 3 (n=2) since 2 (n=3) does not fit; 2 then takes 4; 5 exceeds the
    # limit alone and still runs, alone.
    assert [[j.seed for j in b] for b in recorder.batches[1:]] == [[1, 3], [2, 4], [5]]
    assert [len(r) for r in results[1:]] == [2, 3, 2, 1, 6]
    await batcher.close()


async def test_an_error_reaches_every_job_of_the_batch() -> None:
    clock = FakeClock()
    recorder = Recorder(clock, hold=True)
    batcher = Batcher(recorder, max_batch=4, clock=clock)
    first = await start_blocker(batcher, recorder)
    tasks = [asyncio.create_task(batcher.submit(job(seed))) for seed in range(3)]
    await settle()

    recorder.fail_with = EngineOutOfMemory("boom")
    recorder.release.set()
    results = await asyncio.gather(first, *tasks, return_exceptions=True)

    assert all(isinstance(r, EngineOutOfMemory) for r in results)
    # the batcher survives a failed batch
    recorder.fail_with = None
    assert await batcher.submit(job(7)) == [b"7:0"]
    await batcher.close()


async def test_one_bad_job_fails_alone_and_its_batch_mates_are_served() -> None:
    calls: list[list[int]] = []

    async def picky(jobs: Sequence[GenerationJob]) -> list[list[bytes]]:
        calls.append([j.seed for j in jobs])
        if any(j.seed == 13 for j in jobs):
            raise ValueError("cannot encode prompt")
        return [[f"{j.seed}".encode()] for j in jobs]

    batcher = Batcher(picky, max_batch=4, clock=FakeClock())
    results = await asyncio.gather(
        *(batcher.submit(job(seed)) for seed in (12, 13, 14)), return_exceptions=True
    )
    assert results[0] == [b"12"] and results[2] == [b"14"]
    assert isinstance(results[1], ValueError)
    assert calls == [[12, 13, 14], [12], [13], [14]]
    await batcher.close()


async def test_a_cancelled_waiter_is_dropped_before_it_runs() -> None:
    clock = FakeClock()
    recorder = Recorder(clock, hold=True)
    batcher = Batcher(recorder, max_batch=4, clock=clock)
    first = await start_blocker(batcher, recorder)
    leaving = asyncio.create_task(batcher.submit(job(1)))
    staying = asyncio.create_task(batcher.submit(job(2)))
    await settle()
    assert batcher.queued() == 2

    leaving.cancel()
    await settle()
    assert batcher.queued() == 1
    recorder.release.set()
    await first
    assert await staying == [b"2:0"]

    assert leaving.cancelled()
    ran = [j.seed for b in recorder.batches for j in b]
    assert 1 not in ran
    await batcher.close()


async def test_leaving_during_a_batch_does_not_hurt_the_others() -> None:
    clock = FakeClock()
    recorder = Recorder(clock, hold=True)
    batcher = Batcher(recorder, max_batch=4, clock=clock)
    together = [asyncio.create_task(batcher.submit(job(seed))) for seed in (1, 2)]
    await settle()
    assert [len(b) for b in recorder.batches] == [2]

    together[0].cancel()
    recorder.release.set()
    assert await together[1] == [b"2:0"]
    assert together[0].cancelled()
    await batcher.close()


async def test_busy_seconds_count_runner_time_on_the_clock() -> None:
    clock = FakeClock()
    recorder = Recorder(clock, seconds=2.5, hold=True)
    batcher = Batcher(recorder, max_batch=4, clock=clock)
    assert batcher.busy_seconds() == 0.0
    first = await start_blocker(batcher, recorder)

    clock.advance(1.0)  # the batch is running: its time so far already counts
    assert batcher.busy_seconds() == pytest.approx(1.0)
    recorder.release.set()
    await first
    await batcher.submit(job(1))

    assert batcher.busy_seconds() == pytest.approx(1.0 + 2.5 + 2.5)
    await batcher.close()


async def test_close_fails_queued_jobs_and_refuses_new_ones() -> None:
    clock = FakeClock()
    recorder = Recorder(clock, hold=True)
    batcher = Batcher(recorder, max_batch=1, clock=clock)
    first = await start_blocker(batcher, recorder)
    queued = asyncio.create_task(batcher.submit(job(1)))
    await settle()

    await batcher.close()

    with pytest.raises(EngineFailure):
        await first
    with pytest.raises(EngineFailure, match="closed"):
        await queued
    with pytest.raises(EngineFailure, match="closed"):
        await batcher.submit(job(2))


async def test_a_runner_that_loses_results_fails_the_batch() -> None:
    async def short(jobs: Sequence[GenerationJob]) -> list[list[bytes]]:
        return [[b"x"]]

    batcher = Batcher(short, max_batch=4, clock=FakeClock())
    results = await asyncio.gather(
        batcher.submit(job(1)), batcher.submit(job(2)), return_exceptions=True
    )
    assert all(isinstance(r, EngineFailure) for r in results)
    await batcher.close()


def test_max_batch_must_be_positive() -> None:
    async def never(jobs: Sequence[GenerationJob]) -> list[list[bytes]]:
        raise AssertionError

    with pytest.raises(ValueError, match="max_batch"):
        Batcher(never, max_batch=0, clock=FakeClock())


JOBS = st.lists(
    st.builds(
        job,
        seed=st.integers(0, 10_000),
        n=st.integers(1, 5),
        size=st.sampled_from([Size(64, 64), Size(128, 64)]),
        steps=st.sampled_from([2, 4]),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(jobs=JOBS, max_batch=st.integers(1, 6))
def test_every_job_runs_once_in_a_compatible_batch_that_fits(
    jobs: list[GenerationJob], max_batch: int
) -> None:
    async def scenario() -> tuple[list[list[GenerationJob]], list[list[bytes]]]:
        clock = FakeClock()
        recorder = Recorder(clock)
        batcher = Batcher(recorder, max_batch=max_batch, clock=clock)
        results = await asyncio.gather(*(batcher.submit(j) for j in jobs))
        await batcher.close()
        return recorder.batches, results

    batches, results = asyncio.run(scenario())

    assert sorted(id(j) for b in batches for j in b) == sorted(id(j) for j in jobs)
    for batch in batches:
        assert len({j.batch_key() for j in batch}) == 1
        assert batch_images(batch) <= max_batch or len(batch) == 1
    for j, images in zip(jobs, results, strict=True):
        assert images == [f"{j.seed}:{i}".encode() for i in range(j.n)]
