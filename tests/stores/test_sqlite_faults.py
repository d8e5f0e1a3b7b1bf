"""SqliteQuotaStore when the file is unusable or locked: fail at ping, wait busy_timeout in all,
and keep charge ids across a restart."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

import pytest

from meltguard.daemon.stores import QuotaStoreError, SqliteQuotaStore
from meltguard.values import QuotaWindow

T0 = 1_767_225_600.0
DAY = 86_400.0
ROOT = os.geteuid() == 0


def day(limit: float = 3) -> list[QuotaWindow]:
    return [QuotaWindow(key="{mg:alice}:86400", limit=limit, period=DAY)]


async def test_a_file_that_is_not_a_database_fails_at_ping(tmp_path: Path) -> None:
    path = tmp_path / "quota.sqlite3"
    path.write_bytes(b"this is not an sqlite file at all" * 200)
    store = SqliteQuotaStore(path)
    try:
        with pytest.raises(QuotaStoreError, match="not a database"):
            await store.ping()
    finally:
        await store.close()


def _read_only(directory: Path, path: Path) -> None:
    for leftover in directory.glob("quota.sqlite3-*"):
        leftover.unlink()
    path.chmod(0o444)
    directory.chmod(0o555)


@pytest.mark.skipif(ROOT, reason="root writes through read-only permissions")
async def test_a_read_only_file_fails_at_ping(tmp_path: Path) -> None:
    path = tmp_path / "quota.sqlite3"
    first = SqliteQuotaStore(path)
    await first.ping()
    await first.close()
    _read_only(tmp_path, path)
    store = SqliteQuotaStore(path)
    try:
        with pytest.raises(QuotaStoreError, match=r"readonly|read-only|unable to open"):
            await store.ping()
    finally:
        os.chmod(tmp_path, 0o755)
        await store.close()


@pytest.mark.skipif(ROOT, reason="root writes through read-only permissions")
async def test_a_read_only_directory_fails_at_ping(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o555)
    store = SqliteQuotaStore(tmp_path / "quota.sqlite3")
    try:
        with pytest.raises(QuotaStoreError, match="unable to open"):
            await store.ping()
    finally:
        os.chmod(tmp_path, 0o755)
        await store.close()


async def test_a_call_waits_for_the_lock_busy_timeout_in_all(tmp_path: Path) -> None:
    # The issue: with another process holding the lock, a request waited 4 s on a 2 s
    # busy_timeout, because its batch queued behind one that had already waited.
    path = tmp_path / "quota.sqlite3"
    store = SqliteQuotaStore(path, busy_timeout=0.6)
    await store.ping()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")

    async def timed(delay: float) -> float:
        await asyncio.sleep(delay)
        started = time.monotonic()
        with pytest.raises(QuotaStoreError, match="locked"):
            await store.consume(day(), 1, T0)
        return time.monotonic() - started

    try:
        # The second call arrives while the first one's batch is waiting: it goes next.
        waits = await asyncio.gather(timed(0.0), timed(0.3))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert waits[0] >= 0.5
    assert waits[1] < 0.6 + 0.25, waits  # not 0.3 + 0.6 behind the first, then 0.6 more
    assert (await store.consume(day(), 1, T0)).allowed
    await store.close()


async def test_charge_ids_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "quota.sqlite3"
    first = SqliteQuotaStore(path)
    charged = await first.consume(day(), 1, T0, charge_id="kept")
    await first.refund(day(), 1, T0, charge_id="voided-early")
    await first.close()
    second = SqliteQuotaStore(path)
    try:
        assert (await second.consume(day(), 1, T0 + 1, charge_id="kept")).allowed
        assert not (await second.consume(day(), 1, T0 + 1, charge_id="voided-early")).allowed
        assert (await second.peek(day(), T0 + 2)).windows[0].used == 1
        await second.refund(day(), 1, charged.charged_at, charge_id="kept")
        await second.refund(day(), 1, charged.charged_at, charge_id="kept")
        assert (await second.peek(day(), T0 + 2)).windows[0].used == 0
    finally:
        await second.close()
