"""OverLimitCache around real stores: refusals answered locally, never for longer than `hold`
after the store would admit again."""

from __future__ import annotations

import time

from meltguard.admission.quota_memory import MemoryQuotaStore
from meltguard.daemon.stores.overlimit import HOLD_SECONDS, OverLimitCache
from meltguard.values import QuotaWindow

from .conftest import RedisServer, relaxed_store

T0 = 1_767_225_600.0


def day(tenant: str, limit: float = 2) -> list[QuotaWindow]:
    return [QuotaWindow(key=f"{tenant}:86400", limit=limit, period=86_400.0)]


async def test_refusals_are_answered_without_a_round_trip(
    redis_server: RedisServer, tenant: str
) -> None:
    store = OverLimitCache(relaxed_store(redis_server.url))
    try:
        windows = day(tenant)
        while (await store.consume(windows, 1, time.time())).allowed:
            pass
        calls = redis_server.command_calls("evalsha")
        now = time.time()
        for i in range(50):
            refused = await store.consume(windows, 1, now + i * 0.01)
            assert not refused.allowed
            assert refused.exhausted is not None and refused.exhausted.used == 2
        assert redis_server.command_calls("evalsha") == calls
    finally:
        await store.close()


async def test_a_flushed_redis_admits_again_within_the_hold(
    redis_server: RedisServer, tenant: str
) -> None:
    # The case: Redis restarted empty (or FLUSHALL): /v1/quota says 0 used, and the
    # cache must not keep refusing until the window ends.
    store = OverLimitCache(relaxed_store(redis_server.url, caller_clock=True))
    try:
        windows = day(tenant)
        assert (await store.consume(windows, 2, T0)).allowed
        assert not (await store.consume(windows, 1, T0 + 1)).allowed
        admin = redis_server.client()
        try:
            admin.flushall()
        finally:
            admin.close()
        # Inside the hold the cached refusal may stand; past it the store is asked again.
        assert not (await store.consume(windows, 1, T0 + 1 + HOLD_SECONDS / 2)).allowed
        again = await store.consume(windows, 1, T0 + 1 + HOLD_SECONDS)
        assert again.allowed and again.windows[0].used == 1
    finally:
        await store.close()


async def test_another_replicas_refund_is_seen_within_the_hold(
    redis_server: RedisServer, tenant: str
) -> None:
    here = OverLimitCache(relaxed_store(redis_server.url, caller_clock=True))
    there = relaxed_store(redis_server.url, caller_clock=True)
    try:
        windows = day(tenant)
        charged = await there.consume(windows, 2, T0)
        assert not (await here.consume(windows, 1, T0 + 1)).allowed
        await there.refund(windows, 2, charged.charged_at)
        assert (await here.consume(windows, 1, T0 + 1 + HOLD_SECONDS)).allowed
    finally:
        await here.close()
        await there.close()


async def test_what_still_fits_goes_to_the_store() -> None:
    inner = MemoryQuotaStore()
    store = OverLimitCache(inner)
    windows = day("{mg:t}", limit=3)
    assert (await store.consume(windows, 2.5, T0)).allowed
    assert not (await store.consume(windows, 1, T0 + 0.1)).allowed
    # Half an image fits on top of the remembered 2.5: the store is asked, and says yes.
    assert (await store.consume(windows, 0.5, T0 + 0.2)).allowed
    refused = await store.consume(windows, 0.5, T0 + 0.3)
    assert not refused.allowed and refused.windows[0].used == 3
    # A raised limit (quota_factor eased) is checked against the cached usage at once.
    assert (await store.consume(day("{mg:t}", limit=4), 1, T0 + 0.4)).allowed


async def test_own_refund_and_peek_forget_the_refusal() -> None:
    inner = MemoryQuotaStore()
    store = OverLimitCache(inner)
    windows = day("{mg:t}", limit=1)
    charged = await store.consume(windows, 1, T0, charge_id="a")
    assert not (await store.consume(windows, 1, T0 + 0.1)).allowed
    await store.refund(windows, 1, charged.charged_at, charge_id="a")
    assert (await store.consume(windows, 1, T0 + 0.2)).allowed
    assert not (await store.consume(windows, 1, T0 + 0.3)).allowed
    await inner.refund(windows, 1, T0)  # behind the cache's back
    assert (await store.peek(windows, T0 + 0.4)).windows[0].used == 0
    assert (await store.consume(windows, 1, T0 + 0.5)).allowed
