"""The QuotaStore contract, run against every store with explicit `now` values.

Redis runs with `caller_clock=True` here: the script then uses the test's `now` instead of
Redis `TIME`, so window boundaries can be crossed without sleeping. test_redis.py covers the
production clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meltguard.admission.quota_memory import MemoryQuotaStore
from meltguard.daemon.stores import SqliteQuotaStore
from meltguard.protocols import QuotaStore
from meltguard.values import QuotaWindow

from .conftest import RedisServer, relaxed_store

DAY = 86_400.0
T0 = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC, a day boundary (and a minute boundary)


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[QuotaStore]:
    made: QuotaStore
    if request.param == "memory":
        made = MemoryQuotaStore()
    elif request.param == "sqlite":
        made = SqliteQuotaStore(f"{tmp_path}/quota.sqlite3")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        made = relaxed_store(server.url, caller_clock=True)
    try:
        yield made
    finally:
        await made.close()


def windows(
    tenant: str, day_limit: float = 3, minute_limit: float | None = None
) -> list[QuotaWindow]:
    found = [QuotaWindow(key=f"{tenant}:86400", limit=day_limit, period=DAY)]
    if minute_limit is not None:
        found.append(QuotaWindow(key=f"{tenant}:60", limit=minute_limit, period=60.0))
    return found


async def test_allows_until_the_limit_exactly(store: QuotaStore, tenant: str) -> None:
    day = windows(tenant, day_limit=3)
    for i in range(3):
        outcome = await store.consume(day, 1, T0 + 10 + i)
        assert outcome.allowed
        assert outcome.windows[0].used == i + 1
    refused = await store.consume(day, 1, T0 + 20)
    assert not refused.allowed
    assert refused.exhausted is not None and refused.exhausted.window == day[0]
    assert refused.windows[0].used == 3 and refused.windows[0].remaining == 0
    # The reset a client is told is the next 00:00 UTC.
    assert refused.windows[0].reset_at == T0 + DAY


async def test_fractional_costs_fill_the_limit_within_epsilon(
    store: QuotaStore, tenant: str
) -> None:
    day = windows(tenant, day_limit=1)
    assert all([(await store.consume(day, 1 / 3, T0 + i)).allowed for i in range(3)])
    assert not (await store.consume(day, 1 / 3, T0 + 4)).allowed


async def test_a_request_larger_than_what_is_left_is_refused_whole(
    store: QuotaStore, tenant: str
) -> None:
    day = windows(tenant, day_limit=3)
    assert (await store.consume(day, 2, T0)).allowed
    refused = await store.consume(day, 2, T0 + 1)
    assert not refused.allowed and refused.windows[0].used == 2
    assert (await store.consume(day, 1, T0 + 2)).allowed


async def test_all_or_nothing_across_two_windows(store: QuotaStore, tenant: str) -> None:
    both = windows(tenant, day_limit=5, minute_limit=2)
    assert (await store.consume(both, 1, T0 + 1)).allowed
    assert (await store.consume(both, 1, T0 + 2)).allowed
    refused = await store.consume(both, 1, T0 + 3)
    assert not refused.allowed
    assert refused.exhausted is not None and refused.exhausted.window == both[1]
    # The day window was not charged for the refused request.
    peeked = await store.peek(both, T0 + 4)
    assert [s.used for s in peeked.windows] == [2, 2]
    # Next minute: the minute window is fresh, the day keeps counting.
    later = await store.consume(both, 1, T0 + 61)
    assert later.allowed
    assert [s.used for s in later.windows] == [3, 1]
    assert [s.reset_at for s in later.windows] == [T0 + DAY, T0 + 120]


async def test_refused_by_the_first_window_charges_neither(store: QuotaStore, tenant: str) -> None:
    both = windows(tenant, day_limit=1, minute_limit=5)
    assert (await store.consume(both, 1, T0)).allowed
    refused = await store.consume(both, 1, T0 + 70)
    assert not refused.allowed
    assert refused.exhausted is not None and refused.exhausted.window == both[0]
    assert [s.used for s in (await store.peek(both, T0 + 71)).windows] == [1, 0]


async def test_refund_restores_exactly_what_was_charged(store: QuotaStore, tenant: str) -> None:
    both = windows(tenant, day_limit=3, minute_limit=3)
    first = await store.consume(both, 1.25, T0 + 5)
    second = await store.consume(both, 0.5, T0 + 6)
    assert first.allowed and second.allowed
    await store.refund(both, 1.25, first.charged_at)
    assert [s.used for s in (await store.peek(both, T0 + 7)).windows] == [0.5, 0.5]


async def test_refund_never_goes_below_zero(store: QuotaStore, tenant: str) -> None:
    day = windows(tenant, day_limit=2)
    charged = await store.consume(day, 1, T0)
    await store.refund(day, 1, charged.charged_at)
    await store.refund(day, 1, charged.charged_at)
    assert (await store.peek(day, T0 + 1)).windows[0].used == 0
    # And the refund did not bank credit: the limit is still exactly the limit.
    assert (await store.consume(day, 2, T0 + 2)).allowed
    assert not (await store.consume(day, 0.5, T0 + 3)).allowed


async def test_refund_after_rollover_leaves_the_new_window_alone(
    store: QuotaStore, tenant: str
) -> None:
    minute = [QuotaWindow(key=f"{tenant}:60", limit=2, period=60.0)]
    old = await store.consume(minute, 1, T0 + 59)
    assert old.allowed
    new = await store.consume(minute, 2, T0 + 60)
    assert new.allowed and new.windows[0].used == 2
    await store.refund(minute, 1, old.charged_at)
    assert (await store.peek(minute, T0 + 61)).windows[0].used == 2
    assert not (await store.consume(minute, 1, T0 + 62)).allowed


async def test_peek_does_not_charge(store: QuotaStore, tenant: str) -> None:
    day = windows(tenant, day_limit=1)
    for _ in range(3):
        peeked = await store.peek(day, T0)
        assert peeked.allowed and peeked.windows[0].used == 0
    assert (await store.consume(day, 1, T0)).allowed
    full = await store.peek(day, T0 + 1)
    assert not full.allowed
    assert full.exhausted is not None and full.exhausted.remaining == 0
    assert full.windows[0].reset_at == T0 + DAY


async def test_windows_reset_at_the_period_boundary(store: QuotaStore, tenant: str) -> None:
    day = windows(tenant, day_limit=2)
    end = T0 + DAY
    assert (await store.consume(day, 2, end - 1)).allowed
    assert not (await store.consume(day, 1, end - 0.001)).allowed
    fresh = await store.consume(day, 1, end)
    assert fresh.allowed
    assert fresh.windows[0].used == 1 and fresh.windows[0].reset_at == end + DAY
    assert fresh.charged_at == end


async def test_limit_changes_apply_to_the_current_window(store: QuotaStore, tenant: str) -> None:
    # quota_factor moves the limit while a window runs: the usage stays, the bar moves.
    tight = windows(tenant, day_limit=1.5)
    assert (await store.consume(tight, 1, T0)).allowed
    assert not (await store.consume(tight, 1, T0 + 1)).allowed
    loose = windows(tenant, day_limit=3)
    again = await store.consume(loose, 1, T0 + 2)
    assert again.allowed and again.windows[0].used == 2


# -- named charges: retried calls count once, a refund before its consume voids it ------------


async def test_a_repeated_consume_with_one_id_charges_once(store: QuotaStore, tenant: str) -> None:
    day = windows(tenant, day_limit=3)
    first = await store.consume(day, 1, T0, charge_id="c1")
    again = await store.consume(day, 1, T0 + 1, charge_id="c1")
    assert first.allowed and again.allowed
    assert (await store.peek(day, T0 + 2)).windows[0].used == 1


async def test_a_repeated_refund_with_one_id_gives_back_once(
    store: QuotaStore, tenant: str
) -> None:
    day = windows(tenant, day_limit=3)
    kept = await store.consume(day, 1, T0, charge_id="kept")
    gone = await store.consume(day, 1, T0 + 1, charge_id="gone")
    await store.refund(day, 1, gone.charged_at, charge_id="gone")
    await store.refund(day, 1, gone.charged_at, charge_id="gone")
    assert kept.allowed
    # The second refund did not eat into the other charge.
    assert (await store.peek(day, T0 + 2)).windows[0].used == 1


async def test_a_refund_before_its_consume_voids_it(store: QuotaStore, tenant: str) -> None:
    both = windows(tenant, day_limit=3, minute_limit=3)
    await store.consume(both, 1, T0, charge_id="other")
    await store.refund(both, 1, T0 + 1, charge_id="late")
    # The refund found nothing to give back, and the other charge is intact.
    assert [s.used for s in (await store.peek(both, T0 + 1)).windows] == [1, 1]
    late = await store.consume(both, 1, T0 + 2, charge_id="late")
    assert not late.allowed and late.exhausted is None  # not charged, and not a quota refusal
    assert [s.used for s in (await store.peek(both, T0 + 3)).windows] == [1, 1]
    # A refund of the voided id after all that still gives nothing back.
    await store.refund(both, 1, T0 + 2, charge_id="late")
    assert [s.used for s in (await store.peek(both, T0 + 3)).windows] == [1, 1]


async def test_a_refused_consume_leaves_its_id_free(store: QuotaStore, tenant: str) -> None:
    day = windows(tenant, day_limit=1)
    assert (await store.consume(day, 1, T0, charge_id="a")).allowed
    assert not (await store.consume(day, 1, T0 + 1, charge_id="b")).allowed
    await store.refund(day, 1, T0, charge_id="a")
    # "b" was refused, not charged: a retry of it may charge now that there is room.
    assert (await store.consume(day, 1, T0 + 2, charge_id="b")).allowed
    assert (await store.peek(day, T0 + 3)).windows[0].used == 1


async def test_ids_and_plain_calls_mix(store: QuotaStore, tenant: str) -> None:
    day = windows(tenant, day_limit=3)
    named = await store.consume(day, 1, T0, charge_id="n")
    plain = await store.consume(day, 1, T0 + 1)
    await store.refund(day, 1, plain.charged_at)
    await store.refund(day, 1, named.charged_at, charge_id="n")
    assert (await store.peek(day, T0 + 2)).windows[0].used == 0
