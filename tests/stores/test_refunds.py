"""RefundingStore against a real redis-server that is frozen, stopped and restarted: no refund
is lost, none is given twice, and a charge whose answer never came is voided."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from meltguard.admission.quota_memory import MemoryQuotaStore
from meltguard.daemon.stores import QuotaStoreError, RedisQuotaStore
from meltguard.daemon.stores.refunds import RefundingStore
from meltguard.values import QuotaWindow

from .conftest import RedisServer, relaxed_store


def day(tenant: str, limit: float = 10) -> list[QuotaWindow]:
    return [QuotaWindow(key=f"{tenant}:86400", limit=limit, period=86_400.0)]


async def used(server: RedisServer, windows: list[QuotaWindow]) -> float:
    reader = relaxed_store(server.url)
    try:
        return (await reader.peek(windows, time.time())).windows[0].used
    finally:
        await reader.close()


async def drained(store: RefundingStore, within: float = 10.0) -> None:
    give_up = time.monotonic() + within
    while store.pending:
        assert time.monotonic() < give_up, f"{store.pending} refunds still pending"
        await asyncio.sleep(0.02)


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RefundingStore]:
    # Production timeouts, so a frozen Redis fails calls fast; a short backoff for the test.
    made = RefundingStore(RedisQuotaStore(redis_server.url), backoff_min=0.01, backoff_max=0.1)
    try:
        yield made
    finally:
        redis_server.ensure_running()
        await made.close()


async def test_refunds_made_while_redis_is_frozen_land_after_it_resumes(
    store: RefundingStore, redis_server: RedisServer, tenant: str
) -> None:
    windows = day(tenant)
    charges = [await store.consume(windows, 1, time.time(), charge_id=f"c{i}") for i in range(4)]
    redis_server.pause()
    try:
        with capture_logs() as logs:
            for i, charged in enumerate(charges):
                # Returns without raising: the refund is the queue's now.
                await store.refund(windows, 1, charged.charged_at, charge_id=f"c{i}")
            assert store.pending == 4
            await asyncio.sleep(0.3)  # retries keep failing meanwhile
        assert store.pending == 4 and store.refunds_total["retry"] >= 4
        assert not any(line["event"] == "quota.refunded" for line in logs)
        assert not store.health.ok
    finally:
        redis_server.resume()
    with capture_logs() as logs:
        await drained(store)
    assert await used(redis_server, windows) == 0
    assert store.refunds_total["success"] == 4
    assert sum(line["event"] == "quota.refunded" for line in logs) == 4
    assert store.health.ok


async def test_refunds_survive_a_redis_restart(
    store: RefundingStore, redis_server: RedisServer, tenant: str
) -> None:
    windows = day(tenant)
    charged = await store.consume(windows, 2, time.time(), charge_id="r")
    redis_server.stop()  # SIGTERM: the snapshot keeps the charge
    await store.refund(windows, 2, charged.charged_at, charge_id="r")
    await asyncio.sleep(0.2)
    assert store.pending == 1
    redis_server.start()
    await drained(store)
    assert await used(redis_server, windows) == 0


async def test_a_consume_without_an_answer_is_voided_when_redis_resumes(
    store: RefundingStore, redis_server: RedisServer, tenant: str
) -> None:
    windows = day(tenant)
    await store.consume(windows, 1, time.time(), charge_id="warm")  # a pooled connection
    redis_server.pause()
    try:
        # The script is on the wire when the deadline passes: Redis runs it once it wakes.
        with pytest.raises(QuotaStoreError):
            await store.consume(windows, 1, time.time(), charge_id="lost")
        assert store.pending == 1
    finally:
        redis_server.resume()
    await drained(store)
    # The lost charge was given back (or never made): only the first one stays.
    assert await used(redis_server, windows) == 1
    # A retry of the lost consume (the same id) charges nothing now.
    again = await store.consume(windows, 1, time.time(), charge_id="lost")
    assert not again.allowed
    assert await used(redis_server, windows) == 1


async def test_a_caller_who_leaves_during_consume_is_not_charged(
    store: RefundingStore, redis_server: RedisServer, tenant: str
) -> None:
    windows = day(tenant)
    await store.consume(windows, 1, time.time(), charge_id="warm")
    redis_server.pause()
    try:
        task = asyncio.create_task(store.consume(windows, 1, time.time(), charge_id="gone"))
        await asyncio.sleep(0.02)  # on the wire, no answer yet
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        redis_server.resume()
    await drained(store)
    assert await used(redis_server, windows) == 1


async def test_close_drains_what_it_can_and_counts_the_rest(
    redis_server: RedisServer, tenant: str
) -> None:
    windows = day(tenant)
    store = RefundingStore(RedisQuotaStore(redis_server.url), backoff_min=0.01,
                           backoff_max=0.05, drain_timeout=0.5)
    charged = await store.consume(windows, 1, time.time(), charge_id="a")
    redis_server.stop()
    await store.refund(windows, 1, charged.charged_at, charge_id="a")
    with capture_logs() as logs:
        started = time.monotonic()
        await store.close()
    assert time.monotonic() - started < 3.0
    assert store.refunds_total["abandoned"] == 1
    assert [line["count"] for line in logs if line["event"] == "quota.refunds_abandoned"] == [1]

    # With the store back in time, close gives everything back before it closes the store.
    redis_server.start()
    store = RefundingStore(RedisQuotaStore(redis_server.url), backoff_min=0.01,
                           backoff_max=0.05, drain_timeout=5.0)
    charged = await store.consume(windows, 1, time.time(), charge_id="b")
    redis_server.pause()
    await store.refund(windows, 1, charged.charged_at, charge_id="b")
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0.2)
    redis_server.resume()
    await closing
    assert store.refunds_total["success"] == 1 and store.refunds_total["abandoned"] == 0
    assert await used(redis_server, windows) == 1  # "a" stayed charged: it was abandoned


async def test_the_queue_is_bounded(redis_server: RedisServer, tenant: str) -> None:
    windows = day(tenant)
    store = RefundingStore(RedisQuotaStore(redis_server.url), max_pending=2,
                           backoff_min=0.01, backoff_max=0.05, drain_timeout=0.1)
    try:
        await store.consume(windows, 1, time.time())
        redis_server.stop()
        with capture_logs() as logs:
            for _ in range(3):
                await store.refund(windows, 1, time.time())
        assert store.pending == 2 and store.refunds_total["dropped"] == 1
        assert [line["event"] for line in logs].count("quota.refund_dropped") == 1
    finally:
        await store.close()


class _SlowRefunds(MemoryQuotaStore):
    """Our own store whose refunds take a while, recording when it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    async def refund(self, windows: Any, cost: float, charged_at: float, *,
                     charge_id: str | None = None) -> None:
        await asyncio.sleep(0.2)
        await super().refund(windows, cost, charged_at, charge_id=charge_id)
        self.events.append("refunded")

    async def close(self) -> None:
        self.events.append("closed")
        await super().close()


async def test_close_waits_for_a_refund_in_progress_before_closing_the_store() -> None:
    inner = _SlowRefunds()
    store = RefundingStore(inner)
    windows = day("{mg:slow}")
    charged = await store.consume(windows, 1, 1_767_225_600.0, charge_id="s")
    refund = asyncio.create_task(store.refund(windows, 1, charged.charged_at, charge_id="s"))
    await asyncio.sleep(0.01)
    await store.close()
    await refund
    assert inner.events == ["refunded", "closed"]
    assert store.refunds_total == {"success": 1, "retry": 0, "dropped": 0, "abandoned": 0}


class _FailsTimes(MemoryQuotaStore):
    """Our own store whose refunds fail the first `times` calls."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.left = times
        self.consume_fails = False

    async def consume(self, windows: Any, cost: float, now: float, *,
                      charge_id: str | None = None) -> Any:
        if self.consume_fails:
            raise QuotaStoreError("memory", "no answer in time")  # outcome unknown
        return await super().consume(windows, cost, now, charge_id=charge_id)

    async def refund(self, windows: Any, cost: float, charged_at: float, *,
                     charge_id: str | None = None) -> None:
        if self.left:
            self.left -= 1
            raise QuotaStoreError("memory", "down")
        await super().refund(windows, cost, charged_at, charge_id=charge_id)


async def test_retries_back_off_exponentially_with_jitter_up_to_the_cap() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    inner = _FailsTimes(8)
    store = RefundingStore(inner, backoff_min=0.05, backoff_max=1.0, sleep=sleep,
                           rng=lambda: 1.0)  # the top of each jitter range
    windows = day("{mg:b}")
    charged = await store.consume(windows, 1, 1_767_225_600.0, charge_id="x")
    await store.refund(windows, 1, charged.charged_at, charge_id="x")
    await drained(store)
    assert slept == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]  # the direct try, then 7 retries
    assert store.refunds_total["retry"] == 8 and store.refunds_total["success"] == 1
    assert (await inner.peek(windows, 1_767_225_601.0)).windows[0].used == 0
    await store.close()


async def test_a_consume_that_surely_never_ran_is_not_voided(
    store: RefundingStore, redis_server: RedisServer, tenant: str
) -> None:
    redis_server.stop()  # connection refused: nothing can have been charged
    with pytest.raises(QuotaStoreError) as caught:
        await store.consume(day(tenant), 1, time.time(), charge_id="never")
    assert caught.value.maybe_applied is False
    assert store.pending == 0


async def test_a_full_queue_drops_a_void_before_a_refund() -> None:
    inner = _FailsTimes(1_000)
    store = RefundingStore(inner, max_pending=2, backoff_min=10.0, drain_timeout=0.05)
    windows = day("{mg:full}")
    try:
        inner.consume_fails = True
        for name in ("v1", "v2"):
            with pytest.raises(QuotaStoreError):
                await store.consume(windows, 1, 1_767_225_600.0, charge_id=name)
        assert store.pending == 2
        await store.refund(windows, 1, 1_767_225_600.0, charge_id="real")
        assert store.pending == 2 and store.refunds_total["dropped"] == 1
        assert [e.charge_id for e in store._queue] == ["v2", "real"]
    finally:
        await store.close()


async def test_a_refund_after_close_is_counted_abandoned_not_retried_forever() -> None:
    store = RefundingStore(MemoryQuotaStore())
    windows = day("{mg:late}")
    await store.close()
    with capture_logs() as logs:
        await store.refund(windows, 1, 1_767_225_600.0, charge_id="late")
    assert store.pending == 0 and store.refunds_total["abandoned"] == 1
    assert [line["event"] for line in logs] == ["quota.refunds_abandoned"]
