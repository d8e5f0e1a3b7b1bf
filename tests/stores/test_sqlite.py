"""SqliteQuotaStore: restarts, several processes on one file, and a loop that never waits."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from meltguard.daemon.stores import QuotaStoreError, SqliteQuotaStore
from meltguard.values import QuotaWindow

T0 = 1_767_225_600.0
DAY = 86_400.0


def day(limit: float, key: str = "{mg:alice}:86400") -> list[QuotaWindow]:
    return [QuotaWindow(key=key, limit=limit, period=DAY)]


async def test_survives_a_restart_on_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "quota.sqlite3"  # parents are created
    first = SqliteQuotaStore(path)
    assert (await first.consume(day(3), 2, T0)).allowed
    await first.close()
    second = SqliteQuotaStore(path)
    try:
        assert (await second.peek(day(3), T0 + 1)).windows[0].used == 2
        assert (await second.consume(day(3), 1, T0 + 2)).allowed
        assert not (await second.consume(day(3), 1, T0 + 3)).allowed
    finally:
        await second.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _consume_many(path: str, attempts: int, barrier: Barrier, results: Queue[int]) -> None:
    """Runs in a child process: race the others for the same tenant's quota."""

    async def run() -> int:
        store = SqliteQuotaStore(path, busy_timeout=10.0)
        await store.ping()
        barrier.wait()
        allowed = 0
        for i in range(attempts):
            allowed += (await store.consume(day(150), 1, T0 + i * 0.001)).allowed
            # Spaced as a daemon's requests are. Back to back, sqlite's busy handler (a waiter
            # retries after 1, 2, 5, 10 ... ms) can leave one process out of the whole race,
            # which lasts a few ms: fair enough for admissions, but nothing to assert on.
            await asyncio.sleep(0.0005)
        await store.close()
        return allowed

    results.put(asyncio.run(run()))


def test_processes_racing_on_one_file_never_exceed_the_limit(tmp_path: Path) -> None:
    path = str(tmp_path / "quota.sqlite3")
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds threads
    workers = 3
    barrier = ctx.Barrier(workers)
    results: Queue[int] = ctx.Queue()
    procs = [
        ctx.Process(target=_consume_many, args=(path, 100, barrier, results))
        for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    counts = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=10)
        assert proc.exitcode == 0
    assert sum(counts) == 150
    # Each process got some: they really did race rather than run one after another.
    assert all(count > 0 for count in counts)


async def test_a_locked_file_waits_off_the_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "quota.sqlite3"
    store = SqliteQuotaStore(path, busy_timeout=0.3)
    await store.ping()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        started = time.monotonic()
        with pytest.raises(QuotaStoreError, match="locked"):
            await store.consume(day(3), 1, T0)
        waited = time.monotonic() - started
        assert waited >= 0.25
        # The loop kept running while sqlite waited for the lock.
        assert ticks >= 10
    finally:
        task.cancel()
        holder.execute("ROLLBACK")
        holder.close()
    assert (await store.consume(day(3), 1, T0)).allowed
    await store.close()


async def test_ended_windows_are_garbage_collected(tmp_path: Path) -> None:
    path = tmp_path / "quota.sqlite3"
    store = SqliteQuotaStore(path)
    try:
        for i in range(5):
            await store.consume(day(3, key=f"{{mg:t{i}}}:86400"), 1, T0)
        await store.consume(day(3), 1, T0 + 3 * DAY)
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM quota_usage").fetchone()[0] == 1


async def test_an_unusable_path_is_a_quota_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = SqliteQuotaStore(blocker / "quota.sqlite3")
    try:
        with pytest.raises(QuotaStoreError, match="sqlite quota store"):
            await store.ping()
        with pytest.raises(QuotaStoreError):
            await store.consume(day(3), 1, T0)
    finally:
        await store.close()


async def test_a_closed_store_refuses_calls(tmp_path: Path) -> None:
    store = SqliteQuotaStore(tmp_path / "quota.sqlite3")
    await store.close()
    await store.close()  # twice is fine
    with pytest.raises(QuotaStoreError, match="closed"):
        await store.consume(day(3), 1, T0)


async def test_stores_opening_a_new_file_at_once_all_open_it(tmp_path: Path) -> None:
    # Switching a new file to WAL is a race sqlite's busy handler does not wait out; the
    # store retries it within busy_timeout (rare: a few in a thousand opens without that).
    for i in range(30):
        stores = [SqliteQuotaStore(tmp_path / f"{i}.sqlite3") for _ in range(3)]
        try:
            await asyncio.gather(*(store.ping() for store in stores))
        finally:
            for store in stores:
                await store.close()
