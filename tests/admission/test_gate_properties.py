"""Properties of the gate over random traffic: quotas hold, refunds are exact, priority wins."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meltguard.admission.auth import Caller
from meltguard.admission.cost import ImageAsk
from meltguard.admission.gate import Gate, Permit
from meltguard.admission.policy import Level, Policy, parse_policy
from meltguard.admission.quota_memory import MemoryQuotaStore
from meltguard.admission.scheduler import QueueTimeout, Scheduler, Slot
from meltguard.clock import FakeClock
from meltguard.errors import ErrorCode, ServiceError
from meltguard.values import QuotaWindow, Size

PROPERTY_SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TIERS = ("free", "plus", "pro")
LEVELS = tuple(Level)


class NoTimers:
    class Handle:
        def cancel(self) -> None:
            pass

    def __call__(self, delay: float, callback: Callable[[], None]) -> NoTimers.Handle:
        return NoTimers.Handle()


async def spin(rounds: int = 8) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


# -- quotas never exceeded; refunds exact -------------------------------------------------------

QUOTA_POLICY = parse_policy({
    "version": 1,
    "tiers": {
        "free": {"priority": 0, "quotas": [{"limit": 3, "per": "1d"}, {"limit": 2, "per": "1m"}],
                 "max_concurrent": 100},
        "plus": {"priority": 1, "quotas": [{"limit": 5, "per": "1h"}, {"limit": 2, "per": "10s"}],
                 "max_concurrent": 100},
        "pro": {"priority": 2, "quotas": [{"limit": 10, "per": "1d"}], "max_concurrent": 100},
    },
    "cost": {"reference": {"size": "512x512", "steps": 30}},
    # Never a wait: this property is about quotas, the queue has its own below.
    "concurrency": {"limit": 128, "min_limit": 100},
    "actions": {
        "elevated": {"free": {"quota_factor": 0.5, "max_steps": 20},
                     "plus": {"quota_factor": 0.75}},
        "high": {"free": {"reject": True}, "plus": {"quota_factor": 0.5, "max_size": "256x256"},
                 "pro": {"quota_factor": 0.5}},
        "critical": {"free": {"reject": True}, "plus": {"reject": True},
                     "pro": {"quota_factor": 0.25}},
    },
})

admit_op = st.tuples(
    st.just("admit"), st.integers(0, 2), st.sampled_from(TIERS), st.integers(5, 45),
    st.sampled_from([Size(256, 256), Size(512, 512), Size(768, 512)]), st.integers(1, 2),
)
quota_ops = st.lists(st.one_of(
    admit_op, admit_op,
    st.tuples(st.just("advance"), st.sampled_from([0.5, 3.0, 11.0, 59.0, 600.0, 86_400.0])),
    st.tuples(st.just("level"), st.sampled_from(LEVELS)),
    st.tuples(st.just("settle"), st.integers(0, 1_000),
              st.sampled_from(["success", "dropped", "ignored", "failed"])),
    st.tuples(st.just("drain")),
), min_size=10, max_size=60)

Slot_ = tuple[str, int]  # (window key, window id)


@PROPERTY_SETTINGS
@given(quota_ops)
def test_admitted_cost_never_exceeds_limit_times_factor_and_refunds_are_exact(
    ops: list[tuple[Any, ...]],
) -> None:
    asyncio.run(_quota_scenario(ops))


async def _quota_scenario(ops: list[tuple[Any, ...]]) -> None:
    clock = FakeClock(start=3600.0)
    store = MemoryQuotaStore()
    gate = Gate(QUOTA_POLICY, store, clock, lambda event: None, random.Random(0),
                call_later=NoTimers())
    # What the tenant holds per window, by our own bookkeeping: charges minus refunds.
    ledger: dict[Slot_, float] = defaultdict(float)
    probes: dict[Slot_, tuple[QuotaWindow, float]] = {}
    live: list[Permit] = []

    def slots_of(permit: Permit) -> list[Slot_]:
        assert permit.quota is not None
        return [(s.window.key, s.window.window_id(permit.charged_at))
                for s in permit.quota.windows]

    async def check_store_matches_ledger() -> None:
        await gate.drain()
        for slot, (window, at) in probes.items():
            outcome = await store.peek([window], at)
            assert abs(outcome.windows[0].used - ledger[slot]) < 1e-9, slot

    for op in ops:
        kind = op[0]
        if kind == "admit":
            _, who, tier, steps, size, n = op
            caller = Caller(f"{tier}{who}", tier, False)
            try:
                permit = await gate.admit(caller, ImageAsk("p", size=size, steps=steps, n=n))
            except ServiceError as err:
                assert err.code in {ErrorCode.RATE_LIMIT_EXCEEDED, ErrorCode.DAILY_QUOTA_EXCEEDED,
                                    ErrorCode.SERVER_OVERLOADED}
                assert err.retry_after is not None and 1.0 <= err.retry_after <= 60.0
                continue
            assert permit.quota is not None and permit.charged == permit.cost
            eff = QUOTA_POLICY.effective(tier, gate.level)
            limits = {q.per: q.limit * eff.quota_factor for q in eff.quotas}
            for state, slot in zip(permit.quota.windows, slots_of(permit), strict=True):
                ledger[slot] += permit.charged
                probes[slot] = (state.window, permit.charged_at)
                # The property: within any window, what is held fits the scaled limit.
                assert ledger[slot] <= limits[state.window.period] + 1e-9
            live.append(permit)
            if len(live) > 60:  # stay far below the concurrency floor
                live.pop(0).settle("success")
        elif kind == "advance":
            clock.advance(op[1])
        elif kind == "level":
            gate.set_pressure(op[1], 0.0)
        elif kind == "settle" and live:
            permit = live.pop(op[1] % len(live))
            permit.settle(op[2])
            if op[2] != "success":
                for slot in slots_of(permit):
                    ledger[slot] -= permit.charged
        elif kind == "drain":
            await check_store_matches_ledger()
    for permit in live:
        permit.settle("failed")
        for slot in slots_of(permit):
            ledger[slot] -= permit.charged
    await check_store_matches_ledger()


# -- the scheduler never lets a lower tier overtake a higher one that could run ------------------

SCHED_POLICY = parse_policy({
    "version": 1,
    "tiers": {
        "free": {"priority": 0, "max_concurrent": 1, "max_queue_wait": "20s"},
        "plus": {"priority": 1, "max_concurrent": 2, "max_queue_wait": "60s"},
        "pro": {"priority": 2, "max_concurrent": 2, "max_queue_wait": "120s"},
    },
    "concurrency": {"limit": 3, "min_limit": 1},
    "actions": {
        "elevated": {"free": {"concurrency_factor": 0.5}},
        "high": {"plus": {"concurrency_factor": 0.5}},
        "critical": {"pro": {"concurrency_factor": 0.5}, "plus": {"concurrency_factor": 0.25}},
    },
})
PRIORITY = {name: tier.priority for name, tier in SCHED_POLICY.tiers.items()}


class CheckedScheduler(Scheduler):
    """Asserts at every grant that no higher-priority waiter could have taken the slot."""

    grants = 0

    def _grant(self, waiter: Any) -> None:
        for tier, tenant in self.pending():
            if PRIORITY[tier] > PRIORITY[waiter.tier]:
                assert not self.can_start(tier, tenant), (
                    f"{waiter.tier}/{waiter.tenant} dispatched ahead of {tier}/{tenant}")
        self.grants += 1
        super()._grant(waiter)


@PROPERTY_SETTINGS
@given(
    st.lists(st.tuples(st.sampled_from(TIERS[::-1]), st.integers(0, 2)), min_size=2, max_size=24),
    st.sampled_from(LEVELS),
    st.integers(1, 4),
)
def test_dispatch_order_respects_priority(
    arrivals: list[tuple[str, int]], level: Level, limit: int
) -> None:
    asyncio.run(_dispatch_scenario(arrivals, level, limit))


async def _dispatch_scenario(arrivals: list[tuple[str, int]], level: Level, limit: int) -> None:
    policy = SCHED_POLICY.model_copy(
        update={"concurrency": SCHED_POLICY.concurrency.model_copy(update={"limit": limit})})
    sched = CheckedScheduler(policy, FakeClock(), call_later=NoTimers())
    # Everything queues behind held slots, then drains one release at a time.
    held = [await sched.acquire("pro", f"holder{i}", 1.0, None) for i in range(limit)]
    sched.set_level(level)
    tasks = [asyncio.create_task(sched.acquire(tier, f"{tier}-{who}", 1.0, None))
             for tier, who in arrivals]
    await spin()
    assert sum(sched.queue_depth().values()) == len(arrivals)
    running = list(held)
    while running:
        running.pop(0).release()
        await spin()
        running.extend(t.result() for t in tasks if t.done() and not t.result().released
                       and t.result() not in running)
    assert all(task.done() for task in tasks)
    assert sched.grants == limit + len(arrivals)


arrive_op = st.tuples(
    st.just("arrive"), st.sampled_from(TIERS), st.integers(0, 3),
    st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from([None, 5.0, 30.0]),
)
sched_ops = st.lists(st.one_of(
    arrive_op, arrive_op, arrive_op,
    st.tuples(st.just("finish"), st.integers(0, 100), st.sampled_from(["success", "drop"])),
    st.tuples(st.just("finish"), st.integers(0, 100), st.just("success")),
    st.tuples(st.just("cancel"), st.integers(0, 100)),
    st.tuples(st.just("advance"), st.sampled_from([1.0, 6.0, 31.0])),
    st.tuples(st.just("level"), st.sampled_from(LEVELS)),
), min_size=10, max_size=80)


@PROPERTY_SETTINGS
@given(sched_ops)
def test_no_lower_tier_is_dispatched_ahead_of_a_higher_one(ops: list[tuple[Any, ...]]) -> None:
    asyncio.run(_sched_scenario(ops))


async def _sched_scenario(ops: list[tuple[Any, ...]]) -> None:
    clock = FakeClock()
    sched = CheckedScheduler(SCHED_POLICY, clock, call_later=NoTimers())
    waiting: list[asyncio.Task[Slot]] = []
    running: list[Slot] = []

    def collect() -> None:
        for task in [t for t in waiting if t.done()]:
            waiting.remove(task)
            if task.cancelled():
                continue
            exc = task.exception()
            if exc is None:
                running.append(task.result())
            else:
                assert isinstance(exc, QueueTimeout)

    for op in ops:
        kind = op[0]
        if kind == "arrive":
            _, tier, tenant, cost, max_wait = op
            waiting.append(asyncio.create_task(
                sched.acquire(tier, f"{tier}-{tenant}", cost, max_wait)))
        elif kind == "finish" and running:
            slot = running.pop(op[1] % len(running))
            if op[2] == "success":
                sched.record_success(1.0, slot.cost)
            else:
                sched.record_drop()
            slot.release()
        elif kind == "cancel" and waiting:
            waiting[op[1] % len(waiting)].cancel()
        elif kind == "advance":
            clock.advance(op[1])
            sched.expire_due()
        elif kind == "level":
            sched.set_level(op[1])
        await spin()
        collect()
        # Work conserving: nobody waits who could run now.
        for tier, tenant in sched.pending():
            assert not sched.can_start(tier, tenant)
        # Book-keeping matches what the tasks see.
        assert sched.inflight_total == len(running)
        assert sum(sched.queue_depth().values()) == len(waiting)
        for tier in TIERS:
            assert sched.inflight()[tier] == sum(1 for s in running if s.tier == tier)

    for task in waiting:
        task.cancel()
    await spin()
    collect()
    for slot in running:
        slot.release()
    assert sched.inflight_total == 0 and sum(sched.queue_depth().values()) == 0


# -- the gate never sheds a higher tier while it admits a lower one -----------------------------


@st.composite
def monotone_policies(draw: st.DrawFn) -> Policy:
    """Policies whose actions respect priority: rejects hit the lowest tiers first, and a
    higher tier may wait at least as long as a lower one (else the property cannot hold)."""
    waits = sorted(draw(st.lists(st.sampled_from([5, 10, 20, 60, 120]), min_size=3, max_size=3)))
    actions: dict[str, dict[str, dict[str, Any]]] = {}
    shed = 0
    for level in ("elevated", "high", "critical"):
        shed = draw(st.integers(shed, 3))
        actions[level] = {TIERS[i]: {"reject": True} for i in range(shed)}
    return parse_policy({
        "version": 1,
        "tiers": {name: {"priority": i, "max_concurrent": draw(st.integers(1, 3)),
                         "max_queue_wait": waits[i]} for i, name in enumerate(TIERS)},
        "concurrency": {"limit": draw(st.integers(1, 3)), "min_limit": 1},
        "actions": actions,
    })


load_arrive = st.tuples(st.just("arrive"), st.sampled_from(TIERS), st.integers(0, 3))
load_finish = st.tuples(st.just("finish"), st.integers(0, 100), st.sampled_from([1.0, 4.0, 15.0]))
load_ops = st.lists(st.one_of(
    load_arrive, load_arrive, load_arrive, load_finish, load_finish,
    st.tuples(st.just("level"), st.sampled_from(LEVELS)),
    st.tuples(st.just("probe")), st.tuples(st.just("probe")),
), min_size=8, max_size=40)


@PROPERTY_SETTINGS
@given(monotone_policies(), load_ops)
def test_no_higher_tier_is_shed_while_a_lower_one_gets_in(
    policy: Policy, ops: list[tuple[Any, ...]]
) -> None:
    asyncio.run(_shed_scenario(policy, ops))


async def _shed_scenario(policy: Policy, ops: list[tuple[Any, ...]]) -> None:
    clock = FakeClock()
    gate = Gate(policy, MemoryQuotaStore(), clock, lambda event: None, random.Random(0),
                call_later=NoTimers())
    pending: list[asyncio.Task[Permit]] = []
    running: list[Permit] = []
    probe_id = 0

    def collect() -> None:
        for task in [t for t in pending if t.done()]:
            pending.remove(task)
            if not task.cancelled() and task.exception() is None:
                running.append(task.result())

    async def probe() -> None:
        nonlocal probe_id
        # Highest tier first. A shed request leaves the state as it was, so every lower tier
        # after it faces the same queue and must be shed too; a request that gets in (or
        # queues) only adds load for those after it, and a lower tier arriving later may
        # wait behind it: that is no inversion.
        outcomes: list[bool] = []
        tasks = []
        for tier in reversed(TIERS):
            probe_id += 1
            task = asyncio.create_task(gate.admit(Caller(f"probe{probe_id}", tier, False),
                                                  ImageAsk("p")))
            await spin(3)
            error = task.exception() if task.done() and not task.cancelled() else None
            shed = isinstance(error, ServiceError) and error.code == ErrorCode.SERVER_OVERLOADED
            outcomes.append(not shed)
            tasks.append(task)
        first_shed = outcomes.index(False) if False in outcomes else len(outcomes)
        assert not any(outcomes[first_shed:]), (
            f"{dict(zip(reversed(TIERS), outcomes, strict=True))} at {gate.level.label}")
        for task in tasks:
            task.cancel()
        await spin()
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().settle("ignored")

    for op in ops:
        kind = op[0]
        if kind == "arrive":
            pending.append(asyncio.create_task(
                gate.admit(Caller(f"{op[1]}-{op[2]}", op[1], False), ImageAsk("p"))))
        elif kind == "finish" and running:
            permit = running.pop(op[1] % len(running))
            clock.advance(op[2])
            permit.settle("success", seconds=op[2])
        elif kind == "level":
            gate.set_pressure(op[1], 10.0)
        elif kind == "probe":
            await probe()
        await spin()
        collect()
    await probe()
    for task in pending:
        task.cancel()
    await spin()
    collect()
    for permit in running:
        permit.settle("success")
    await gate.drain()
    assert sum(gate.snapshot().inflight.values()) == 0
