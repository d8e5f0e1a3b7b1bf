"""A quota refusal is answered again from memory for up to REFUSAL_MEMORY seconds: the same
answer the store would give, without asking it, and never once a refund could have changed
the answer."""

from __future__ import annotations

import random
import traceback
from collections.abc import Sequence

import pytest

from meltguard.admission.cost import ImageAsk
from meltguard.admission.events import Decided, Event
from meltguard.admission.gate import REFUSAL_MEMORY, Gate, Permit
from meltguard.admission.policy import Level, Policy
from meltguard.admission.quota_memory import MemoryQuotaStore
from meltguard.clock import FakeClock
from meltguard.errors import ErrorCode, ServiceError
from meltguard.values import QuotaOutcome, QuotaWindow, Size
from tests.admission.test_gate import FREE, ONE, PRO, NoTimers, make_policy


class CountingStore:
    """The in-process store behind the QuotaStore Protocol, counting the calls it answers."""

    name = "counting"

    def __init__(self, inner: MemoryQuotaStore | None = None) -> None:
        self.inner = inner if inner is not None else MemoryQuotaStore()
        self.consumes = 0

    async def consume(self, windows: Sequence[QuotaWindow], cost: float,
                      now: float, *, charge_id: str | None = None) -> QuotaOutcome:
        self.consumes += 1
        return await self.inner.consume(windows, cost, now, charge_id=charge_id)

    async def refund(self, windows: Sequence[QuotaWindow], cost: float,
                     charged_at: float, *, charge_id: str | None = None) -> None:
        await self.inner.refund(windows, cost, charged_at, charge_id=charge_id)

    async def peek(self, windows: Sequence[QuotaWindow], now: float) -> QuotaOutcome:
        return await self.inner.peek(windows, now)

    async def close(self) -> None:
        await self.inner.close()


def gate_on(store: CountingStore, clock: FakeClock, policy: Policy | None = None) -> Gate:
    return Gate(policy or make_policy(), store, clock, lambda event: None, random.Random(7),
                call_later=NoTimers())


async def use_up_free_minute(gate: Gate) -> None:
    """The free tier may start 2 images a minute."""
    for _ in range(2):
        (await gate.admit(FREE, ONE)).settle("success", seconds=1.0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=3600.0)


async def test_decide_returns_a_refusal_and_admit_raises_it(clock: FakeClock) -> None:
    gate = gate_on(CountingStore(), clock)
    await use_up_free_minute(gate)
    refusal = await gate.decide(FREE, ONE)
    assert isinstance(refusal, ServiceError)
    assert refusal.code is ErrorCode.RATE_LIMIT_EXCEEDED and refusal.__traceback__ is None
    with pytest.raises(ServiceError) as raised:
        await gate.admit(FREE, ONE)
    assert raised.value.code is ErrorCode.RATE_LIMIT_EXCEEDED


async def test_the_same_refusal_is_answered_without_the_store_until_the_memory_ends(
    clock: FakeClock,
) -> None:
    store = CountingStore()
    gate = gate_on(store, clock)
    await use_up_free_minute(gate)
    first = await gate.decide(FREE, ONE)
    asked = store.consumes
    clock.advance(0.5)
    again = await gate.decide(FREE, ImageAsk("a lighthouse"))  # equal, not the same object
    assert store.consumes == asked
    assert isinstance(first, ServiceError) and isinstance(again, ServiceError)
    assert again.message == first.message and again.code is first.code
    # Retry-After counts down to the window's reset; it is not frozen with the memory.
    assert first.retry_after is not None and again.retry_after is not None
    assert again.retry_after == pytest.approx(first.retry_after - 0.5)

    clock.advance(REFUSAL_MEMORY)
    await gate.decide(FREE, ONE)
    assert store.consumes == asked + 1


async def test_another_ask_of_the_same_cost_is_validated_but_not_counted_again(
    clock: FakeClock,
) -> None:
    store = CountingStore()
    gate = gate_on(store, clock)
    await use_up_free_minute(gate)
    await gate.decide(FREE, ONE)
    asked = store.consumes
    other = await gate.decide(FREE, ImageAsk("a different prompt, same cost"))
    assert isinstance(other, ServiceError) and other.code is ErrorCode.RATE_LIMIT_EXCEEDED
    assert store.consumes == asked
    bad = await gate.decide(FREE, ImageAsk(""))  # a bad request is a 400, not a quota answer
    assert isinstance(bad, ServiceError) and bad.code is ErrorCode.INVALID_REQUEST


async def test_a_cheaper_ask_goes_to_the_store_and_may_fit(clock: FakeClock) -> None:
    store = CountingStore()
    gate = gate_on(store, clock)
    (await gate.admit(FREE, ONE)).settle("success", seconds=1.0)  # 1 of the minute's 2
    double = ImageAsk("a lighthouse", size=Size(1024, 512))  # two reference images
    assert isinstance(await gate.decide(FREE, double), ServiceError)
    asked = store.consumes
    cheaper = await gate.decide(FREE, ONE)
    assert store.consumes == asked + 1
    assert isinstance(cheaper, Permit)
    cheaper.settle("success", seconds=1.0)


async def test_a_refund_to_the_tenant_forgets_its_refusal(clock: FakeClock) -> None:
    store = CountingStore()
    gate = gate_on(store, clock)
    first = await gate.admit(FREE, ONE)
    second_task = gate.admit(FREE, ONE)
    first.settle("success", seconds=1.0)
    second = await second_task
    assert isinstance(await gate.decide(FREE, ONE), ServiceError)
    second.settle("failed")  # the engine failed: its image is given back
    await gate.drain()
    admitted = await gate.decide(FREE, ONE)
    assert isinstance(admitted, Permit)
    admitted.settle("success", seconds=1.0)


async def test_a_refund_by_another_daemon_is_seen_once_the_memory_ends(
    clock: FakeClock,
) -> None:
    shared = MemoryQuotaStore()
    here, there = CountingStore(shared), CountingStore(shared)
    gate_here, gate_there = gate_on(here, clock), gate_on(there, clock)
    permit = await gate_there.admit(FREE, ONE)  # 1 of the minute's 2, there
    (await gate_here.admit(FREE, ONE)).settle("success", seconds=1.0)  # 2 of 2, here
    assert isinstance(await gate_here.decide(FREE, ONE), ServiceError)
    permit.settle("failed")
    await gate_there.drain()
    # A refund this gate did not make: the memory still answers, for at most its length.
    assert isinstance(await gate_here.decide(FREE, ONE), ServiceError)
    clock.advance(REFUSAL_MEMORY)
    again = await gate_here.decide(FREE, ONE)
    assert isinstance(again, Permit)
    again.settle("success", seconds=1.0)


async def test_a_new_pressure_level_or_policy_is_decided_afresh(clock: FakeClock) -> None:
    store = CountingStore()
    gate = gate_on(store, clock)
    await use_up_free_minute(gate)
    await gate.decide(FREE, ONE)
    asked = store.consumes
    gate.set_pressure(Level.ELEVATED, 0.0)  # the free tier's quota halves
    refusal = await gate.decide(FREE, ONE)
    assert store.consumes == asked + 1
    assert isinstance(refusal, ServiceError) and "reduced to 0.5x" in refusal.message
    gate.set_pressure(Level.NORMAL, 0.0)
    gate.set_policy(make_policy())
    await gate.decide(FREE, ONE)
    assert store.consumes == asked + 2


async def test_shadow_mode_always_asks_the_store(clock: FakeClock) -> None:
    store = CountingStore()
    gate = gate_on(store, clock, make_policy(mode="shadow"))
    for _ in range(4):
        permit = await gate.admit(FREE, ONE)  # shadow admits everything
        permit.settle("success", seconds=1.0)
    assert store.consumes == 4


async def test_other_tenants_are_not_answered_from_one_tenants_refusal(
    clock: FakeClock,
) -> None:
    store = CountingStore()
    gate = gate_on(store, clock)
    await use_up_free_minute(gate)
    assert isinstance(await gate.decide(FREE, ONE), ServiceError)
    asked = store.consumes
    permit = await gate.decide(PRO, ONE)
    assert store.consumes == asked + 1
    assert isinstance(permit, Permit)
    permit.settle("success", seconds=1.0)


async def test_every_refusal_from_memory_still_reports_its_decision(clock: FakeClock) -> None:
    events: list[Event] = []
    gate = Gate(make_policy(), CountingStore(), clock, events.append, random.Random(7),
                call_later=NoTimers())
    await use_up_free_minute(gate)
    for _ in range(3):
        assert isinstance(await gate.decide(FREE, ONE), ServiceError)
    refusals = [e for e in events if isinstance(e, Decided) and e.decision == "reject"]
    assert len(refusals) == 3
    assert set(refusals) == {
        Decided("free", "fiona", "reject", "rate_limit_exceeded", Level.NORMAL, 1.0, 0.0)}


async def test_a_refusal_at_the_retry_cap_is_one_error_raised_without_old_frames(
    clock: FakeClock,
) -> None:
    gate = gate_on(CountingStore(), clock)
    await use_up_free_minute(gate)
    clock.advance(60.0)
    (await gate.admit(FREE, ONE)).settle("success", seconds=1.0)  # the day's 3rd and last
    first = await gate.decide(FREE, ONE)
    assert isinstance(first, ServiceError) and first.code is ErrorCode.DAILY_QUOTA_EXCEEDED
    assert first.retry_after == 60.0  # the day resets in 22 h: the cap
    clock.advance(0.5)
    assert await gate.decide(FREE, ONE) is first  # nothing in it changed, so nothing new

    depths = []
    for _ in range(3):
        with pytest.raises(ServiceError) as raised:
            await gate.admit(FREE, ONE)
        assert raised.value is first
        depths.append(len(traceback.extract_tb(raised.value.__traceback__)))
    assert depths[0] == depths[1] == depths[2]  # each raise starts a fresh traceback


async def test_a_tenant_admitted_at_once_again_and_again_reports_one_decided(
    clock: FakeClock,
) -> None:
    events: list[Event] = []
    gate = Gate(make_policy(), CountingStore(), clock, events.append, random.Random(7),
                call_later=NoTimers())
    for level in (Level.NORMAL, Level.NORMAL, Level.ELEVATED, Level.ELEVATED):
        gate.set_pressure(level, 0.0)
        (await gate.admit(PRO, ONE)).settle("success", seconds=1.0)
    (await gate.admit(PRO, ImageAsk("two", n=2))).settle("success", seconds=1.0)
    decided = [e for e in events if isinstance(e, Decided)]
    assert decided[0] is decided[1] and decided[2] is decided[3]
    assert decided[0] == Decided("pro", "petra", "admit", "ok", Level.NORMAL, 1.0, 0.0)
    assert decided[2] == Decided("pro", "petra", "admit", "ok", Level.ELEVATED, 1.0, 0.0)
    assert decided[4] == Decided("pro", "petra", "admit", "ok", Level.ELEVATED, 2.0, 0.0)
