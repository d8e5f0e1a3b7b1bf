from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meltguard.admission.policy import Level, Policy, PolicyError, parse_policy
from meltguard.admission.scheduler import QueueTimeout, Scheduler, Slot
from meltguard.clock import FakeClock


def make_policy(limit: int = 2, min_limit: int = 1, **tier_overrides: Any) -> Policy:
    tiers: dict[str, Any] = {
        "free": {"priority": 0, "max_concurrent": 1, "max_queue_wait": "20s"},
        "plus": {"priority": 1, "max_concurrent": 2, "max_queue_wait": "60s"},
        "pro": {"priority": 2, "max_concurrent": 4, "max_queue_wait": "120s"},
    }
    for name, extra in tier_overrides.items():
        tiers[name] = {**tiers[name], **extra}
    return parse_policy({
        "version": 1,
        "tiers": tiers,
        "concurrency": {"limit": limit, "min_limit": min_limit},
        "actions": {"elevated": {"free": {"concurrency_factor": 0.5}},
                    "critical": {"pro": {"concurrency_factor": 0.5}}},
    })


class ManualTimers:
    """A call_later that only fires when the test says so."""

    def __init__(self) -> None:
        self.armed: list[tuple[float, Callable[[], None], ManualTimers.Handle]] = []

    class Handle:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    def __call__(self, delay: float, callback: Callable[[], None]) -> ManualTimers.Handle:
        handle = ManualTimers.Handle()
        self.armed.append((delay, callback, handle))
        return handle

    def fire_all(self) -> None:
        armed, self.armed = self.armed, []
        for _, callback, handle in armed:
            if not handle.cancelled:
                callback()


async def spin(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


class Harness:
    def __init__(self, policy: Policy, level: Level = Level.NORMAL) -> None:
        self.clock = FakeClock()
        self.timers = ManualTimers()
        self.sched = Scheduler(policy, self.clock, level=level, call_later=self.timers)
        self.order: list[str] = []

    def start(self, tier: str, tenant: str, label: str, cost: float = 1.0,
              max_wait: float | None = 100.0) -> asyncio.Task[Slot]:
        async def run() -> Slot:
            slot = await self.sched.acquire(tier, tenant, cost, max_wait)
            self.order.append(label)
            return slot
        return asyncio.create_task(run())


async def test_a_free_slot_is_granted_without_waiting() -> None:
    h = Harness(make_policy())
    slot = await h.sched.acquire("pro", "a", 1.0, 10.0)
    assert slot.waited == 0.0 and h.sched.inflight_total == 1
    slot.release()
    slot.release()  # twice is harmless
    assert h.sched.inflight_total == 0


async def test_highest_priority_goes_first() -> None:
    h = Harness(make_policy(limit=1))
    holder = await h.sched.acquire("pro", "holder", 1.0, None)
    tasks = [h.start("free", "f", "free"), h.start("plus", "p", "plus"),
             h.start("pro", "q", "pro")]
    await spin()
    assert h.sched.queue_depth() == {"pro": 1, "plus": 1, "free": 1}
    holder.release()
    for _ in range(3):
        await spin()
        running = [t.result() for t in tasks if t.done() and not t.result().released]
        assert len(running) == 1
        running[0].release()
    assert h.order == ["pro", "plus", "free"]


async def test_tenants_take_turns_inside_a_tier_and_each_is_fifo() -> None:
    h = Harness(make_policy(limit=1))
    holder = await h.sched.acquire("pro", "holder", 1.0, None)
    tasks = [h.start("pro", "a", f"a{i}") for i in range(1, 4)]
    tasks += [h.start("pro", "b", "b1"), h.start("pro", "c", "c1"), h.start("pro", "b", "b2")]
    await spin()
    holder.release()
    for _ in range(len(tasks)):
        await spin()
        running = [t for t in tasks if t.done() and not t.result().released]
        assert len(running) == 1
        running[0].result().release()
    assert h.order == ["a1", "b1", "c1", "a2", "b2", "a3"]


async def test_per_tenant_cap_holds_a_tenant_but_not_others() -> None:
    h = Harness(make_policy(limit=3))
    first = await h.sched.acquire("free", "a", 1.0, None)
    second_a = h.start("free", "a", "a2")
    other = h.start("free", "b", "b1")
    await spin()
    assert h.order == ["b1"] and not second_a.done()
    assert not h.sched.can_start("free", "a") and h.sched.can_start("pro", "a")
    first.release()
    await spin()
    assert h.order == ["b1", "a2"]
    other.result().release()
    second_a.result().release()


async def test_per_tier_cap_follows_the_level() -> None:
    h = Harness(make_policy(limit=4), level=Level.CRITICAL)
    assert h.sched.tier_cap("pro") == 2 and h.sched.tier_cap("plus") == 4
    tasks = [h.start("pro", f"t{i}", f"p{i}") for i in range(3)]
    await spin()
    assert h.order == ["p0", "p1"] and h.sched.inflight()["pro"] == 2
    # The third pro waits for its tier, yet a lower tier may use the idle slot.
    plus = h.start("plus", "x", "plus")
    await spin()
    assert h.order == ["p0", "p1", "plus"]
    h.sched.set_level(Level.NORMAL)
    await spin()
    assert h.order == ["p0", "p1", "plus", "p2"]
    for task in [*tasks, plus]:
        task.result().release()


async def test_tier_cap_is_at_least_one() -> None:
    h = Harness(make_policy(limit=1), level=Level.ELEVATED)
    assert h.sched.tier_cap("free") == 1  # floor(1 x 0.5) would starve the tier


async def test_aimd_halves_on_drop_and_climbs_back_additively() -> None:
    h = Harness(make_policy(limit=4, min_limit=1))
    sched = h.sched
    sched.record_drop()
    assert sched.limit == 2
    sched.record_drop()
    sched.record_drop()
    assert sched.limit == 1 and sched.limit_value == 1.0  # not below min_limit
    sched.record_success(1.0, 1.0)
    assert sched.limit_value == 2.0  # +1/limit
    sched.record_success(1.0, 1.0)
    assert sched.limit_value == 2.5
    for _ in range(20):
        sched.record_success(1.0, 1.0)
    assert sched.limit == 4 and sched.limit_value == 4.0  # capped at the policy limit


async def test_a_dropped_limit_holds_new_work_until_inflight_falls() -> None:
    h = Harness(make_policy(limit=2))
    a = await h.sched.acquire("pro", "a", 1.0, None)
    b = await h.sched.acquire("pro", "b", 1.0, None)
    h.sched.record_drop()
    waiting = h.start("pro", "c", "c")
    a.release()
    await spin()
    assert not waiting.done()  # in flight (1) is not below the halved limit (1)
    b.release()
    await spin()
    assert waiting.done()
    waiting.result().release()


async def test_cancelled_waiter_leaves_the_queue() -> None:
    h = Harness(make_policy(limit=1))
    holder = await h.sched.acquire("pro", "holder", 1.0, None)
    task = h.start("pro", "a", "a")
    await spin()
    assert h.sched.queue_depth()["pro"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.sched.queue_depth()["pro"] == 0
    assert all(handle.cancelled for _, _, handle in h.timers.armed)
    holder.release()
    assert h.sched.inflight_total == 0


async def test_cancel_in_the_instant_of_a_grant_does_not_leak() -> None:
    h = Harness(make_policy(limit=1))
    holder = await h.sched.acquire("pro", "holder", 1.0, None)
    task = h.start("pro", "a", "a")
    await spin()
    holder.release()  # grants the waiter synchronously...
    assert h.sched.inflight_total == 1
    task.cancel()  # ...whose task is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.sched.inflight_total == 0 and h.sched.inflight()["pro"] == 0
    again = await h.sched.acquire("pro", "b", 1.0, 0.0)
    again.release()


async def test_cancelled_future_at_the_head_is_skipped() -> None:
    h = Harness(make_policy(limit=1))
    holder = await h.sched.acquire("pro", "holder", 1.0, None)
    gone = h.start("pro", "a", "a")
    kept = h.start("pro", "a", "a2")
    await spin()
    gone.cancel()
    holder.release()  # runs before the cancelled task cleans up
    await spin()
    assert gone.cancelled() and h.order == ["a2"]
    kept.result().release()
    assert h.sched.inflight_total == 0 and h.sched.queue_depth()["pro"] == 0


async def test_queue_timeout_on_the_clock() -> None:
    h = Harness(make_policy(limit=1))
    holder = await h.sched.acquire("pro", "holder", 1.0, None)
    task = h.start("pro", "a", "a", max_wait=5.0)
    await spin()
    assert [delay for delay, _, _ in h.timers.armed] == [5.0]
    h.timers.fire_all()  # the loop timer fires, but the clock has not reached the deadline
    await spin()
    assert not task.done() and len(h.timers.armed) == 1  # re-armed
    h.clock.advance(5.0)
    h.timers.fire_all()
    await spin()
    with pytest.raises(QueueTimeout) as info:
        await task
    assert info.value.waited == 5.0
    assert h.sched.queue_depth()["pro"] == 0
    holder.release()


async def test_overdue_waiters_expire_before_a_release_can_grant_them() -> None:
    h = Harness(make_policy(limit=1))
    holder = await h.sched.acquire("pro", "holder", 1.0, None)
    late = h.start("pro", "a", "a", max_wait=5.0)
    fresh = h.start("pro", "b", "b", max_wait=50.0)
    await spin()
    h.clock.advance(6.0)
    holder.release()
    await spin()
    with pytest.raises(QueueTimeout):
        await late
    assert h.order == ["b"]
    fresh.result().release()


async def test_zero_wait_budget_times_out_at_once_when_full() -> None:
    h = Harness(make_policy(limit=1))
    holder = await h.sched.acquire("pro", "holder", 1.0, None)
    with pytest.raises(QueueTimeout):
        await h.sched.acquire("pro", "a", 1.0, 0.0)
    assert h.sched.queue_depth()["pro"] == 0
    holder.release()


async def test_estimate_needs_a_measurement() -> None:
    h = Harness(make_policy(limit=2))
    assert h.sched.estimate_wait("free", 1.0) is None
    assert h.sched.drain_estimate() == 0.0
    h.sched.record_success(10.0, 2.0)  # 5 s per reference image
    assert h.sched.service_seconds_per_cost == 5.0
    assert h.sched.estimate_wait("free", 1.0) == 0.0  # a slot is free


async def test_estimate_counts_same_or_higher_priority_and_overflow() -> None:
    h = Harness(make_policy(limit=2))
    h.sched.record_success(10.0, 1.0)  # EWMA starts at the first sample: 10 s per image
    slots = [await h.sched.acquire("pro", f"t{i}", 1.0, None) for i in range(2)]
    waiters = [h.start("plus", "p", "p1", cost=1.0), h.start("free", "f", "f1", cost=3.0)]
    await spin()
    # Full GPU: 1 overflow; plus sees itself behind the plus waiter, free behind both.
    assert h.sched.estimate_wait("pro", 2.0) == pytest.approx((0 + 1) * 10 * 2 / 2)
    assert h.sched.estimate_wait("plus", 1.0) == pytest.approx((1 + 1) * 10 * 1 / 2)
    assert h.sched.estimate_wait("free", 1.0) == pytest.approx((2 + 1) * 10 * 1 / 2)
    assert h.sched.drain_estimate() == pytest.approx((1 + 3) * 10 / 2)
    h.sched.record_success(20.0, 1.0)
    assert h.sched.service_seconds_per_cost == pytest.approx(10 + 0.2 * (20 - 10))
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    for slot in slots:
        slot.release()


async def test_set_policy_keeps_queue_and_inflight() -> None:
    h = Harness(make_policy(limit=1))
    holder = await h.sched.acquire("pro", "holder", 1.0, None)
    queued = h.start("free", "f", "f")
    await spin()
    h.sched.set_policy(make_policy(limit=3))
    await spin()
    assert h.sched.limit == 3 and h.order == ["f"]
    queued.result().release()
    holder.release()
    assert h.sched.inflight_total == 0


async def test_reload_keeps_a_backed_off_limit_within_the_new_bounds() -> None:
    h = Harness(make_policy(limit=8, min_limit=1))
    h.sched.record_drop()
    assert h.sched.limit == 4
    h.sched.set_policy(make_policy(limit=16, min_limit=1))
    assert h.sched.limit == 4  # still backing off: climbs back by successes
    h.sched.set_policy(make_policy(limit=3, min_limit=1))
    assert h.sched.limit == 3
    h.sched.set_policy(make_policy(limit=10, min_limit=1))
    assert h.sched.limit == 10  # was at the old ceiling: follows the new one


async def test_a_tier_removed_by_reload_still_drains() -> None:
    h = Harness(make_policy(limit=1))
    holder = await h.sched.acquire("pro", "holder", 1.0, None)
    queued = h.start("free", "f", "f")
    await spin()
    reduced = parse_policy({"version": 1, "tiers": {"pro": {"priority": 2}},
                            "concurrency": {"limit": 1}})
    h.sched.set_policy(reduced)
    assert h.sched.queue_depth() == {"pro": 0, "free": 1}
    holder.release()
    await spin()
    assert h.order == ["f"]
    queued.result().release()
    assert h.sched.queue_depth() == {"pro": 0}
    with pytest.raises(KeyError):
        await h.sched.acquire("free", "f", 1.0, None)


class TickingClock(FakeClock):
    """Moves a microsecond on every reading, as a real clock would."""

    def monotonic(self) -> float:
        self.advance(1e-6)
        return super().monotonic()


async def test_an_immediate_grant_reports_no_wait_on_a_ticking_clock() -> None:
    sched = Scheduler(make_policy(), TickingClock(), call_later=ManualTimers())
    slot = await sched.acquire("pro", "a", 1.0, 10.0)
    assert slot.waited == 0.0
    slot.release()


async def test_the_loop_timer_expires_a_waiter_on_the_real_clock() -> None:
    from meltguard.clock import SystemClock

    sched = Scheduler(make_policy(limit=1), SystemClock())  # default: loop.call_later
    holder = await sched.acquire("pro", "holder", 1.0, None)
    with pytest.raises(QueueTimeout) as info:
        await asyncio.wait_for(sched.acquire("pro", "a", 1.0, 0.02), timeout=5.0)
    assert info.value.waited >= 0.02
    assert sched.queue_depth()["pro"] == 0
    holder.release()


# -- the fast path: a free slot with nobody queued -------------------------------------------


def test_try_acquire_grants_at_once_when_nobody_waits_and_caps_allow() -> None:
    h = Harness(make_policy(limit=2))
    slot = h.sched.try_acquire("free", "a", 1.0)
    assert slot is not None and slot.waited == 0.0
    assert h.sched.inflight() == {"pro": 0, "plus": 0, "free": 1}
    # The tenant cap (free: max_concurrent 1) and the global limit hold on the fast path too.
    assert h.sched.try_acquire("free", "a", 1.0) is None
    other = h.sched.try_acquire("pro", "b", 1.0)
    assert other is not None
    assert h.sched.try_acquire("pro", "c", 1.0) is None  # limit 2 reached
    assert h.sched.try_acquire("nope", "a", 1.0) is None  # unknown tier: acquire raises
    slot.release()
    other.release()
    assert h.sched.inflight_total == 0 and h.timers.armed == []


async def test_try_acquire_never_overtakes_a_queued_waiter() -> None:
    h = Harness(make_policy(limit=1))
    holder = h.sched.try_acquire("pro", "holder", 1.0)
    assert holder is not None
    queued = h.start("free", "f", "free")
    await spin()
    assert h.sched.queue_depth()["free"] == 1
    holder.release()
    await spin()
    # The waiter took the slot on release; with one queued, the fast path stays shut.
    assert h.order == ["free"]
    assert h.sched.try_acquire("pro", "late", 1.0) is None
    queued.result().release()
    assert h.sched.try_acquire("pro", "late", 1.0) is not None


async def test_fast_and_queued_grants_leave_no_deadlines_behind() -> None:
    h = Harness(make_policy(limit=1))
    holder = await h.sched.acquire("pro", "holder", 1.0, 10.0)
    waiters = [h.start("plus", f"t{i}", f"w{i}", max_wait=50.0) for i in range(3)]
    await spin()
    holder.release()
    for _ in waiters:
        await spin()
        running = [t.result() for t in waiters if t.done() and not t.result().released]
        running[0].release()
    assert h.sched.queue_depth() == {"pro": 0, "plus": 0, "free": 0}
    # Served waiters' deadlines are dropped with the last of them, not kept until they pass.
    assert h.sched._deadlines == []


# --- pacing (a duty budget from the thermal model) ------------------------------------------


async def test_pacing_spends_gpu_time_at_the_duty_budget() -> None:
    h = Harness(make_policy(limit=2))
    h.sched.record_success(1.0, 1.0)  # one reference image takes 1 s
    h.sched.set_duty_budget(0.5)
    first = h.sched.try_acquire("pro", "a", 1.0)
    assert first is not None
    first.release()
    # 1 s of GPU time was spent; at half duty the next one may start 2 s later.
    assert h.sched.try_acquire("pro", "a", 1.0) is None
    assert h.sched.estimate_wait("pro", 1.0) == pytest.approx(2.0)
    h.clock.advance(1.9)
    assert h.sched.try_acquire("pro", "a", 1.0) is None
    h.clock.advance(0.1)
    second = h.sched.try_acquire("pro", "a", 1.0)
    assert second is not None
    second.release()
    h.sched.set_duty_budget(None)
    assert h.sched.try_acquire("pro", "a", 1.0) is not None


async def test_a_paced_waiter_is_woken_when_the_budget_allows() -> None:
    h = Harness(make_policy(limit=2))
    h.sched.record_success(2.0, 1.0)
    h.sched.set_duty_budget(0.8)
    (await h.sched.acquire("pro", "a", 1.0, None)).release()
    waiter = h.start("pro", "b", "b", max_wait=None)
    await spin()
    assert not waiter.done()
    assert [round(delay, 6) for delay, _, _ in h.timers.armed] == [2.5]
    assert h.sched.drain_estimate() == pytest.approx(2.0 / 0.8)
    h.clock.advance(2.5)
    h.timers.fire_all()
    await spin()
    assert waiter.done() and waiter.result().waited == pytest.approx(2.5)


async def test_the_bucket_banks_at_most_half_a_reference_image() -> None:
    h = Harness(make_policy(limit=4))
    h.sched.record_success(1.0, 1.0)
    h.sched.set_duty_budget(0.5)
    h.clock.advance(100.0)  # idle for long: still only half an image's worth banked
    assert h.sched.try_acquire("pro", "a", 1.0) is not None  # 0.5 banked -> -0.5
    assert h.sched.try_acquire("pro", "b", 1.0) is None
    assert h.sched.estimate_wait("pro", 1.0) == pytest.approx(1.0)


# --- min_share ------------------------------------------------------------------------------


async def test_a_reserved_tier_goes_first_when_it_is_owed() -> None:
    h = Harness(make_policy(limit=1, free={"min_share": 0.25}))
    holder = await h.sched.acquire("pro", "holder", 1.0, None)
    pros = [h.start("pro", f"p{i}", f"pro{i}") for i in range(6)]
    free = [h.start("free", f"f{i}", f"free{i}") for i in range(2)]
    await spin()
    holder.release()
    for _ in range(8):
        await spin()
        running = [t for t in (*pros, *free) if t.done() and not t.result().released]
        assert len(running) == 1
        running[0].result().release()
    # free is owed a quarter of the holder's grant, so it goes first (a reservation is paid
    # up front, never late by more than one request); then it has had a quarter of four
    # grants once pro2 is granted, and goes again.
    assert h.order == ["free0", "pro0", "pro1", "pro2", "free1", "pro3", "pro4", "pro5"]


async def test_an_idle_reserved_tier_is_not_paid_back_later() -> None:
    h = Harness(make_policy(limit=1, free={"min_share": 0.5}))
    for i in range(6):
        (await h.sched.acquire("pro", f"p{i}", 1.0, None)).release()
    assert h.sched.owed("free") == 1.0  # asked for nothing: owed one request, no more


def test_min_share_must_leave_room_for_priority() -> None:
    with pytest.raises(PolicyError, match="min_share add up to 1"):
        make_policy(free={"min_share": 0.5}, plus={"min_share": 0.5})


@settings(max_examples=60, deadline=None)
@given(
    free_share=st.sampled_from([0.05, 0.1, 0.3]),
    plus_share=st.sampled_from([0.0, 0.2]),
    costs=st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=40, max_size=80),
    limit=st.integers(min_value=1, max_value=3),
)
def test_each_reserved_tier_gets_its_share_of_sustained_demand(
    free_share: float, plus_share: float, costs: list[float], limit: int,
) -> None:
    """Every tier with a min_share and waiters all along gets at least that share of the
    granted cost, within one request, at every point of the run."""
    overrides: dict[str, Any] = {"free": {"min_share": free_share, "max_concurrent": 9}}
    overrides["plus"] = {"min_share": plus_share, "max_concurrent": 9}
    overrides["pro"] = {"max_concurrent": 9}
    policy = make_policy(limit=limit, **overrides)
    shares = {"free": free_share, "plus": plus_share}

    async def scenario() -> None:
        h = Harness(policy)
        granted = {"free": 0.0, "plus": 0.0, "pro": 0.0}
        pending: list[asyncio.Task[Slot]] = []
        next_cost = iter(costs * 3)
        counter = 0
        # Fill the slots first, so that every tier queues from the start (sustained demand).
        holders = [await h.sched.acquire("pro", f"h{i}", 1.0, None) for i in range(limit)]
        for tier in ("free", "plus", "pro"):
            for _ in range(2):
                counter += 1
                pending.append(_start(h, tier, f"{tier}{counter}", next(next_cost)))
        await spin()
        biggest = max(costs)
        running = list(holders)
        for _ in range(len(costs)):
            running.pop(0).release()
            await spin()
            for task in [t for t in pending if t.done()]:
                pending.remove(task)
                slot = task.result()
                granted[slot.tier] += slot.cost
                running.append(slot)
                counter += 1
                pending.append(_start(h, slot.tier, f"{slot.tier}{counter}", next(next_cost)))
            await spin()
            total = sum(granted.values())
            for tier, share in shares.items():
                assert granted[tier] >= share * total - biggest, (tier, granted)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    asyncio.run(scenario())


def _start(h: Harness, tier: str, tenant: str, cost: float) -> asyncio.Task[Slot]:
    return asyncio.create_task(h.sched.acquire(tier, tenant, cost, None))
