from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from meltguard.admission.auth import Caller
from meltguard.admission.cost import ImageAsk
from meltguard.admission.events import Decided, Event, Settled, StoreFailed, Waited
from meltguard.admission.gate import Gate, Permit, quota_windows, window_key
from meltguard.admission.policy import Level, Policy, parse_policy
from meltguard.admission.quota_memory import MemoryQuotaStore
from meltguard.clock import FakeClock
from meltguard.errors import ErrorCode, ServiceError
from meltguard.values import QuotaOutcome, QuotaWindow, Size

FREE = Caller("fiona", "free", False)
PLUS = Caller("paul", "plus", False)
PRO = Caller("petra", "pro", False)
ONE = ImageAsk("a lighthouse")  # 512x512 at 30 steps: exactly one reference image


def policy_data(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "version": 1,
        "anonymous_tier": "free",
        "tiers": {
            "free": {"priority": 0, "max_concurrent": 1, "max_queue_wait": "20s",
                     "quotas": [{"limit": 3, "per": "1d"}, {"limit": 2, "per": "1m"}]},
            "plus": {"priority": 1, "quotas": [{"limit": 200, "per": "1d"}], "max_concurrent": 2,
                     "max_queue_wait": "60s"},
            "pro": {"priority": 2, "quotas": [{"limit": 2000, "per": "1d"}], "max_concurrent": 4,
                    "max_queue_wait": "120s"},
        },
        "cost": {"reference": {"size": "512x512", "steps": 30}},
        "limits": {"max_n": 4, "max_size": "1024x1024", "max_steps": 50, "default_steps": 30},
        "concurrency": {"limit": 2, "min_limit": 1},
        "actions": {
            "elevated": {"free": {"quota_factor": 0.5, "max_queue_wait": "60s", "max_steps": 20}},
            "high": {"free": {"reject": True},
                     "plus": {"quota_factor": 0.5, "max_size": "512x512"}},
            "critical": {"free": {"reject": True}, "plus": {"reject": True},
                         "pro": {"concurrency_factor": 0.5}},
        },
    }
    data.update(overrides)
    return data


def make_policy(**overrides: Any) -> Policy:
    return parse_policy(policy_data(**overrides))


class NoTimers:
    """call_later that never fires: deadlines are driven by the fake clock only."""

    class Handle:
        def cancel(self) -> None:
            pass

    def __call__(self, delay: float, callback: Callable[[], None]) -> NoTimers.Handle:
        return NoTimers.Handle()


class BrokenStore:
    name = "broken"

    def __init__(self) -> None:
        self.calls = 0

    async def consume(self, windows: Sequence[QuotaWindow], cost: float,
                      now: float, *, charge_id: str | None = None) -> QuotaOutcome:
        self.calls += 1
        raise ConnectionError("store is down")

    async def refund(self, windows: Sequence[QuotaWindow], cost: float,
                     charged_at: float, *, charge_id: str | None = None) -> None:
        self.calls += 1
        raise ConnectionError("store is down")

    async def peek(self, windows: Sequence[QuotaWindow], now: float) -> QuotaOutcome:
        raise ConnectionError("store is down")

    async def close(self) -> None:
        pass


class Env:
    def __init__(self, policy: Policy | None = None, store: Any = None) -> None:
        # 01:00:00 UTC: minute windows reset 60 s from now, the day 23 h from now.
        self.clock = FakeClock(start=3600.0)
        self.store = store if store is not None else MemoryQuotaStore()
        self.events: list[Event] = []
        self.gate = Gate(policy or make_policy(), self.store, self.clock, self.events.append,
                         random.Random(7), call_later=NoTimers())

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def last(self) -> Decided:
        return self.of(Decided)[-1]

    async def used(self, caller: Caller, at: float | None = None) -> tuple[float, ...]:
        windows = quota_windows(caller.tenant,
                                self.gate.policy.effective(caller.tier, Level.NORMAL))
        when = self.clock.wall() if at is None else at
        outcome = await self.store.peek(windows, when)
        return tuple(state.used for state in outcome.windows)

    async def refused(self, caller: Caller, ask: ImageAsk = ONE) -> ServiceError:
        with pytest.raises(ServiceError) as info:
            await self.gate.admit(caller, ask)
        return info.value

    def start(self, caller: Caller, ask: ImageAsk = ONE) -> asyncio.Task[Permit]:
        return asyncio.create_task(self.gate.admit(caller, ask))


async def spin(rounds: int = 10) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def assert_retry(err: ServiceError, low: float = 1.0, high: float = 60.0) -> None:
    assert err.retry_after is not None
    assert low <= err.retry_after <= high


# -- the plain path -------------------------------------------------------------------------------


async def test_admit_charges_and_success_keeps_the_charge() -> None:
    env = Env()
    permit = await env.gate.admit(PRO, ONE)
    assert permit.job.size == Size(512, 512) and permit.job.steps == 30
    assert permit.cost == 1.0 and permit.charged == 1.0 and permit.waited == 0.0
    assert permit.degraded == () and permit.quota is not None and permit.quota.allowed
    assert permit.quota.windows[0].used == 1.0
    assert env.last == Decided("pro", "petra", "admit", "ok", Level.NORMAL, 1.0, 0.0, ())
    assert env.of(Waited) == []  # an admission's wait is its Decided's wait_s
    permit.settle("success", seconds=2.0)
    permit.settle("failed")  # settling twice is a no-op
    await env.gate.drain()
    assert await env.used(PRO) == (1.0,)
    assert env.of(Settled) == [Settled("pro", "success", 0.0)]
    assert env.gate.snapshot().inflight["pro"] == 0


async def test_seed_comes_from_the_injected_rng() -> None:
    first = await Env().gate.admit(PRO, ONE)
    second = await Env().gate.admit(PRO, ONE)
    assert first.job.seed == second.job.seed
    assert (await Env().gate.admit(PRO, ImageAsk("x", seed=5))).job.seed == 5


async def test_invalid_request_is_a_decided_reject() -> None:
    env = Env()
    err = await env.refused(PRO, ImageAsk("x", n=9))
    assert err.code == ErrorCode.INVALID_REQUEST and err.param == "n"
    assert env.last.decision == "reject" and env.last.reason == "invalid_request_error"
    assert await env.used(PRO) == (0.0,)


async def test_quota_windows_are_keyed_by_tenant_and_period() -> None:
    assert window_key("alice", 86400.0) == "{mg:alice}:86400"
    assert window_key("anon:10.0.0.1", 60.0) == "{mg:anon:10.0.0.1}:60"
    assert window_key("a", 0.5) == "{mg:a}:0.5"
    windows = quota_windows("fiona", make_policy().effective("free", Level.ELEVATED))
    assert [(w.key, w.limit, w.period) for w in windows] == [
        ("{mg:fiona}:86400", 1.5, 86400.0), ("{mg:fiona}:60", 1.0, 60.0)]


# -- quotas ---------------------------------------------------------------------------------------


async def test_per_minute_then_daily_exhaustion() -> None:
    env = Env()
    for _ in range(2):
        (await env.gate.admit(FREE, ONE)).settle("success")
    err = await env.refused(FREE)
    assert err.code == ErrorCode.RATE_LIMIT_EXCEEDED and err.should_retry is None
    assert err.retry_after == 60.0  # the minute window resets at 01:01:00
    assert isinstance(err.quota, QuotaOutcome) and not err.quota.allowed
    assert "2 reference images per minute" in err.message
    assert env.last.decision == "reject" and env.last.reason == "rate_limit_exceeded"

    env.clock.advance(45)
    err = await env.refused(FREE)
    assert err.retry_after == pytest.approx(15.0)

    env.clock.advance(15)
    (await env.gate.admit(FREE, ONE)).settle("success")
    err = await env.refused(FREE)
    assert err.code == ErrorCode.DAILY_QUOTA_EXCEEDED
    assert err.should_retry is False
    assert err.retry_after == 60.0  # 23 h away, capped
    assert "per day" in err.message and "resets at 2026-01-02 00:00 UTC" in err.message
    assert env.last.reason == "daily_quota_exceeded"
    assert await env.used(FREE) == (3.0, 1.0)


async def test_a_request_larger_than_the_window_says_so() -> None:
    env = Env()
    big = ImageAsk("x", size=Size(768, 512), steps=50)  # 2.5: over 2 a minute, within 3 a day
    err = await env.refused(FREE, big)
    assert err.code == ErrorCode.RATE_LIMIT_EXCEEDED
    assert "this request alone is more than the window allows" in err.message
    assert await env.used(FREE) == (0.0, 0.0)


async def test_the_window_that_resets_last_is_the_one_reported() -> None:
    data = policy_data()
    # The minute window listed first, so the store names it when both refuse.
    data["tiers"]["free"]["quotas"] = [{"limit": 2, "per": "1m"}, {"limit": 3, "per": "1d"}]
    env = Env(parse_policy(data))
    for _ in range(2):
        (await env.gate.admit(FREE, ONE)).settle("success")
    env.clock.advance(60)
    (await env.gate.admit(FREE, ONE)).settle("success")  # minute 1, day 3
    err = await env.refused(FREE, ImageAsk("x", steps=45))  # 1.5 fits neither window
    assert err.code == ErrorCode.DAILY_QUOTA_EXCEEDED and err.should_retry is False


async def test_a_multi_day_window_counts_as_daily() -> None:
    data = policy_data()
    data["tiers"]["plus"]["quotas"] = [{"limit": 1, "per": "7d"}]
    env = Env(parse_policy(data))
    (await env.gate.admit(PLUS, ONE)).settle("success")
    err = await env.refused(PLUS)
    assert err.code == ErrorCode.DAILY_QUOTA_EXCEEDED and "per 7 days" in err.message


async def test_quota_factor_tightens_at_elevated() -> None:
    env = Env()
    env.gate.set_pressure(Level.ELEVATED, 0.0)
    permit = await env.gate.admit(FREE, ImageAsk("x", steps=20))  # cost 2/3, limit 1/min
    permit.settle("success")
    err = await env.refused(FREE, ImageAsk("x", steps=20))
    assert err.code == ErrorCode.RATE_LIMIT_EXCEEDED
    assert "reduced to 0.5x" in err.message and "elevated" in err.message
    env.gate.set_pressure(Level.NORMAL, 0.0)
    (await env.gate.admit(FREE, ImageAsk("x", steps=20))).settle("success")


async def test_a_tier_without_quotas_never_touches_the_store() -> None:
    data = policy_data()
    data["tiers"]["pro"]["quotas"] = []
    store = BrokenStore()
    env = Env(parse_policy(data), store=store)
    permit = await env.gate.admit(PRO, ONE)
    assert permit.quota == QuotaOutcome(True, ()) and store.calls == 0
    permit.settle("failed")
    await env.gate.drain()
    assert store.calls == 0 and env.of(StoreFailed) == []


# -- pressure -------------------------------------------------------------------------------------


async def test_shed_free_at_high_while_pro_is_admitted() -> None:
    env = Env()
    env.gate.set_pressure(Level.HIGH, 30.0)
    err = await env.refused(FREE)
    assert err.code == ErrorCode.SERVER_OVERLOADED and err.status == 503
    assert err.retry_after == 30.0  # empty queue + cooling estimate
    assert "high" in err.message and "free" in err.message
    assert (env.last.tier, env.last.decision, env.last.reason) == (
        "free", "reject", "server_overloaded")
    assert await env.used(FREE) == (0.0, 0.0)  # shed before charging
    permit = await env.gate.admit(PRO, ONE)
    assert permit.degraded == ()
    permit.settle("success")


async def test_shed_uses_overload_status_and_bounds_retry_after() -> None:
    env = Env(make_policy(overload_status=429))
    env.gate.set_pressure(Level.CRITICAL, 500.0)
    err = await env.refused(PLUS)
    assert err.status == 429 and err.retry_after == 60.0
    env.gate.set_pressure(Level.CRITICAL, 0.0)
    assert (await env.refused(PLUS)).retry_after == 1.0
    env.gate.set_pressure(Level.CRITICAL, float("inf"))
    assert (await env.refused(PLUS)).retry_after == 60.0


async def test_degrade_at_elevated_and_high() -> None:
    env = Env()
    env.gate.set_pressure(Level.ELEVATED, 0.0)
    permit = await env.gate.admit(FREE, ImageAsk("x", steps=30))
    assert permit.job.steps == 20 and permit.degraded == ("steps:30->20",)
    assert permit.cost == pytest.approx(20 / 30) and permit.charged == permit.cost
    assert env.last.decision == "degrade" and env.last.reason == "ok"
    assert env.last.degraded == ("steps:30->20",)
    permit.settle("success")

    env.gate.set_pressure(Level.HIGH, 0.0)
    permit = await env.gate.admit(PLUS, ImageAsk("x", size=Size(1024, 768)))
    assert permit.job.size == Size(512, 384) and permit.cost == pytest.approx(0.75)
    permit.settle("success")


# -- refunds --------------------------------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["ignored", "failed", "dropped"])
async def test_refunds_restore_exactly(outcome: Any) -> None:
    env = Env()
    kept = await env.gate.admit(FREE, ImageAsk("x", steps=20))
    kept.settle("success")
    before = await env.used(FREE)
    permit = await env.gate.admit(FREE, ImageAsk("x", size=Size(512, 256), steps=25))
    assert await env.used(FREE) != before
    permit.settle(outcome)
    await env.gate.drain()
    assert await env.used(FREE) == pytest.approx(before)
    assert env.of(Settled)[-1] == Settled("free", outcome, permit.cost)


async def test_dropped_halves_the_concurrency_limit() -> None:
    env = Env(make_policy(concurrency={"limit": 4, "min_limit": 1}))
    permit = await env.gate.admit(PRO, ONE)
    permit.settle("dropped")
    assert env.gate.snapshot().concurrency_limit == 2


async def test_refund_goes_to_the_window_it_was_charged_in() -> None:
    data = policy_data()
    data["tiers"]["free"]["max_concurrent"] = 2
    env = Env(parse_policy(data))
    permit = await env.gate.admit(FREE, ONE)
    charged_at = env.clock.wall()
    env.clock.advance(61)  # the next minute
    (await env.gate.admit(FREE, ONE)).settle("success")
    permit.settle("failed")
    await env.gate.drain()
    assert await env.used(FREE, at=charged_at) == (1.0, 0.0)
    assert await env.used(FREE) == (1.0, 1.0)


async def test_refund_failure_is_reported_not_raised() -> None:
    env = Env(make_policy(on_store_error="open"))
    permit = await env.gate.admit(PRO, ONE)
    env.gate._store = BrokenStore()  # the store breaks while the job runs
    permit.settle("failed")
    await env.gate.drain()
    assert env.of(StoreFailed) == [StoreFailed("broken", "ConnectionError: store is down")]


# -- the queue ------------------------------------------------------------------------------------


async def hold_slots(env: Env, count: int) -> list[Permit]:
    return [await env.gate.admit(Caller(f"holder{i}", "pro", False), ONE) for i in range(count)]


async def test_queue_timeout_refunds_and_says_when_to_retry() -> None:
    env = Env()
    holders = await hold_slots(env, 2)
    task = env.start(FREE)
    await spin()
    charged_at = env.clock.wall()
    assert await env.used(FREE) == (1.0, 1.0)
    assert env.gate.snapshot().queue_depth["free"] == 1
    env.clock.advance(20)
    assert env.gate.expire_waiters() == 1
    with pytest.raises(ServiceError) as info:
        await task
    err = info.value
    assert err.code == ErrorCode.QUEUE_TIMEOUT and err.retry_after == 20.0
    assert env.last.reason == "queue_timeout" and env.last.decision == "reject"
    assert Waited("free", 20.0) in env.events
    assert await env.used(FREE, at=charged_at) == (0.0, 0.0)
    for permit in holders:
        permit.settle("success")


async def test_queued_request_is_admitted_as_queue_when_a_slot_frees() -> None:
    env = Env()
    holders = await hold_slots(env, 2)
    task = env.start(PLUS)
    await spin()
    env.clock.advance(3)
    holders[0].settle("success", seconds=3.0)
    await spin()
    permit = task.result()
    assert permit.waited == 3.0
    assert env.last.decision == "queue" and env.last.wait_s == 3.0
    assert env.of(Waited) == []
    permit.settle("success")
    holders[1].settle("success")


async def measure(env: Env, seconds: float) -> None:
    """Teach the gate that one reference image takes `seconds`."""
    async with await env.gate.admit(Caller("teacher", "pro", False), ONE):
        env.clock.advance(seconds)
    assert env.gate.snapshot().service_seconds_per_cost == seconds


async def test_estimate_over_budget_rejects_at_once_and_refunds() -> None:
    env = Env()
    await measure(env, 10.0)
    holders = await hold_slots(env, 2)
    queued = [env.start(Caller(f"q{i}", "plus", False)) for i in range(4)]
    await spin()
    # free: (4 queued ahead + 1 overflow) x 10 s x cost 1 / 2 slots = 25 s > 20 s budget.
    assert env.gate.scheduler.estimate_wait("free", 1.0) == 25.0
    err = await env.refused(FREE)
    assert err.code == ErrorCode.SERVER_OVERLOADED and err.status == 503
    assert err.retry_after == 5.0  # estimated wait minus the budget
    assert "25 s" in err.message
    assert env.last.reason == "server_overloaded"
    assert await env.used(FREE) == (0.0, 0.0)
    # pro sees only the overflow ahead of it: 5 s, within its 120 s budget, so it queues.
    pro = env.start(PRO)
    await spin()
    assert not pro.done() and env.gate.snapshot().queue_depth["pro"] == 1
    for task in [*queued, pro]:
        task.cancel()
    await asyncio.gather(*queued, pro, return_exceptions=True)
    for permit in holders:
        permit.settle("success")


async def test_no_estimate_rejection_before_a_measurement() -> None:
    env = Env()
    holders = await hold_slots(env, 2)
    queued = [env.start(Caller(f"q{i}", "plus", False)) for i in range(10)]
    free = env.start(FREE)
    await spin()
    assert not free.done()
    for task in [*queued, free]:
        task.cancel()
    await asyncio.gather(*queued, free, return_exceptions=True)
    for permit in holders:
        permit.settle("success")


async def test_cancel_while_queued_refunds_and_leaks_nothing() -> None:
    env = Env()
    holders = await hold_slots(env, 2)
    task = env.start(FREE)
    await spin()
    env.clock.advance(4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await env.gate.drain()
    assert await env.used(FREE) == (0.0, 0.0)
    assert env.of(Settled)[-1] == Settled("free", "ignored", 1.0)
    assert Waited("free", 4.0) in env.events
    snap = env.gate.snapshot()
    assert snap.queue_depth["free"] == 0 and snap.inflight["free"] == 0
    for permit in holders:
        permit.settle("success")
    assert env.gate.snapshot().inflight["pro"] == 0


# -- the permit as a context manager -------------------------------------------------------------


async def test_context_manager_settles_success_with_measured_time() -> None:
    env = Env()
    async with await env.gate.admit(PRO, ONE) as permit:
        env.clock.advance(4.0)
    assert permit.outcome == "success"
    assert env.gate.snapshot().service_seconds_per_cost == 4.0


@pytest.mark.parametrize(("exc", "outcome"), [
    (ServiceError(ErrorCode.GPU_OUT_OF_MEMORY, "oom"), "dropped"),
    (RuntimeError("boom"), "failed"),
    (asyncio.CancelledError(), "ignored"),
])
async def test_context_manager_maps_exceptions(exc: BaseException, outcome: str) -> None:
    env = Env()
    with pytest.raises(type(exc)):
        async with await env.gate.admit(PRO, ONE) as permit:
            raise exc
    assert permit.outcome == outcome
    await env.gate.drain()
    assert await env.used(PRO) == (0.0,)
    assert env.gate.snapshot().inflight["pro"] == 0


async def test_context_manager_uses_the_injected_classifier() -> None:
    class EngineOutOfMemory(Exception):
        pass

    env = Env()
    env.gate._outcome_of = lambda e: "dropped" if isinstance(e, EngineOutOfMemory) else "failed"
    with pytest.raises(EngineOutOfMemory):
        async with await env.gate.admit(PRO, ONE) as permit:
            raise EngineOutOfMemory()
    assert permit.outcome == "dropped"


async def test_explicit_settle_inside_the_block_wins() -> None:
    env = Env()
    async with await env.gate.admit(PRO, ONE) as permit:
        permit.settle("success", seconds=9.0)
        env.clock.advance(100)
    assert env.gate.snapshot().service_seconds_per_cost == 9.0


async def test_unknown_outcome_is_a_programming_error() -> None:
    permit = await Env().gate.admit(PRO, ONE)
    with pytest.raises(ValueError):
        permit.settle("exploded")  # type: ignore[arg-type]


# -- store failures -------------------------------------------------------------------------------


async def test_store_failure_fails_open() -> None:
    env = Env(make_policy(on_store_error="open"), store=BrokenStore())
    permit = await env.gate.admit(FREE, ONE)
    assert permit.quota is None and permit.charged == 0.0
    assert env.of(StoreFailed) == [StoreFailed("broken", "ConnectionError: store is down")]
    assert env.last.decision == "admit" and env.last.reason == "fail_open"
    permit.settle("failed")  # nothing was charged, so nothing to refund
    await env.gate.drain()
    assert len(env.of(StoreFailed)) == 1
    assert env.of(Settled)[-1] == Settled("free", "failed", 0.0)


async def test_store_failure_fails_closed() -> None:
    env = Env(make_policy(on_store_error="closed"), store=BrokenStore())
    err = await env.refused(FREE)
    assert err.code == ErrorCode.QUOTA_STORE_UNAVAILABLE
    assert_retry(err, 1.0, 2.0)
    assert env.last.reason == "quota_store_unavailable"
    assert env.gate.snapshot().inflight["free"] == 0


async def test_quota_status_peeks_with_the_current_factor() -> None:
    env = Env()
    (await env.gate.admit(FREE, ONE)).settle("success")
    env.gate.set_pressure(Level.ELEVATED, 0.0)
    status = await env.gate.quota_status(FREE)
    assert [(s.window.limit, s.used) for s in status.windows] == [(1.5, 1.0), (1.0, 1.0)]
    assert not status.allowed  # the minute window has nothing left
    broken = Env(store=BrokenStore())
    with pytest.raises(ServiceError) as info:
        await broken.gate.quota_status(FREE)
    assert info.value.code == ErrorCode.QUOTA_STORE_UNAVAILABLE
    assert broken.of(StoreFailed)


# -- shadow mode ----------------------------------------------------------------------------------


async def test_shadow_admits_a_shed_request_unchanged() -> None:
    env = Env(make_policy(mode="shadow"))
    env.gate.set_pressure(Level.HIGH, 30.0)
    permit = await env.gate.admit(FREE, ImageAsk("x", steps=40))
    assert permit.job.steps == 40 and permit.degraded == ()
    assert (env.last.decision, env.last.reason) == ("would_reject", "server_overloaded")
    assert permit.charged == permit.cost  # still charged
    permit.settle("success")


async def test_shadow_reports_would_degrade() -> None:
    env = Env(make_policy(mode="shadow"))
    env.gate.set_pressure(Level.ELEVATED, 0.0)
    permit = await env.gate.admit(FREE, ImageAsk("x", steps=30))
    assert permit.job.steps == 30 and permit.degraded == ()
    assert env.last.decision == "would_degrade" and env.last.degraded == ("steps:30->20",)
    permit.settle("success")


async def test_shadow_admits_over_quota() -> None:
    env = Env(make_policy(mode="shadow"))
    for _ in range(2):
        (await env.gate.admit(FREE, ONE)).settle("success")
    permit = await env.gate.admit(FREE, ONE)
    assert (env.last.decision, env.last.reason) == ("would_reject", "rate_limit_exceeded")
    assert permit.charged == 0.0  # the store refused; enforcement would not have charged it
    permit.settle("success")


async def test_shadow_admits_when_the_store_fails_closed() -> None:
    env = Env(make_policy(mode="shadow", on_store_error="closed"), store=BrokenStore())
    permit = await env.gate.admit(FREE, ONE)
    assert (env.last.decision, env.last.reason) == ("would_reject", "quota_store_unavailable")
    permit.settle("success")


async def test_shadow_queues_without_estimate_or_deadline() -> None:
    env = Env(make_policy(mode="shadow"))
    await measure(env, 10.0)
    holders = await hold_slots(env, 2)
    queued = [env.start(Caller(f"q{i}", "plus", False)) for i in range(4)]
    free = env.start(FREE)
    await spin()
    assert not free.done()  # enforcement would have refused on the 25 s estimate
    env.clock.advance(1000)
    env.gate.expire_waiters()
    await spin()
    assert not free.done()  # and would have timed out
    for task in queued:
        task.cancel()
    await asyncio.gather(*queued, return_exceptions=True)
    holders[0].settle("success")
    await spin()
    permit = free.result()
    assert (env.last.decision, env.last.reason) == ("would_reject", "server_overloaded")
    permit.settle("success")
    holders[1].settle("success")


# -- live reload ----------------------------------------------------------------------------------


async def test_set_policy_keeps_counts_and_queues() -> None:
    env = Env()
    (await env.gate.admit(FREE, ONE)).settle("success")
    holders = await hold_slots(env, 2)
    queued = env.start(PLUS)
    await spin()

    data = policy_data()
    data["tiers"]["free"]["quotas"] = [{"limit": 1, "per": "1m"}]
    data["concurrency"] = {"limit": 3, "min_limit": 1}
    env.gate.set_policy(parse_policy(data))
    await spin()
    assert queued.done()  # the new limit let the queued request start
    err = await env.refused(FREE)  # the count from before the reload still applies
    assert err.code == ErrorCode.RATE_LIMIT_EXCEEDED
    queued.result().settle("success")
    for permit in holders:
        permit.settle("success")  # permits from before the reload settle normally
    assert env.gate.snapshot().inflight == {"pro": 0, "plus": 0, "free": 0}


async def test_set_policy_changes_keys() -> None:
    import hashlib

    env = Env()
    assert env.gate.authenticate("Bearer sk-new", "h").anonymous  # no keys configured yet
    data = policy_data(api_keys=[{"key_sha256": hashlib.sha256(b"sk-new").hexdigest(),
                                  "tenant": "nina", "tier": "plus"}])
    env.gate.set_policy(parse_policy(data))
    assert env.gate.authenticate("Bearer sk-new", "h") == Caller("nina", "plus", False)


async def test_caller_of_a_removed_tier_gets_401() -> None:
    env = Env()
    data = policy_data()
    del data["tiers"]["plus"]
    data["actions"]["high"].pop("plus")
    data["actions"]["critical"].pop("plus")
    env.gate.set_policy(parse_policy(data))
    assert (await env.refused(PLUS)).code == ErrorCode.INVALID_API_KEY


# -- snapshot and hooks ---------------------------------------------------------------------------


async def test_snapshot() -> None:
    env = Env()
    env.gate.set_pressure(Level.ELEVATED, 12.0)
    permit = await env.gate.admit(PRO, ONE)
    snap = env.gate.snapshot()
    assert snap.level == Level.ELEVATED and snap.cooling_eta == 12.0 and snap.mode == "enforce"
    assert snap.concurrency_limit == 2
    assert snap.inflight == {"pro": 1, "plus": 0, "free": 0}
    assert snap.queue_depth == {"pro": 0, "plus": 0, "free": 0}
    assert snap.quota_factor == {"free": 0.5, "plus": 1.0, "pro": 1.0}
    assert snap.max_queue_wait == {"free": 60.0, "plus": 60.0, "pro": 120.0}
    with pytest.raises(TypeError):
        snap.inflight["pro"] = 5  # type: ignore[index]
    permit.settle("success")


async def test_retry_hint_and_store_name() -> None:
    env = Env()
    env.gate.set_pressure(Level.HIGH, 7.0)
    assert env.gate.retry_hint() == 7.0
    assert env.gate.store_name == "memory"


async def test_a_failing_event_hook_does_not_leak_slots() -> None:
    env = Env()

    def explode(event: Event) -> None:
        raise RuntimeError("metrics broke")

    env.gate._on_event = explode
    permit = await env.gate.admit(PRO, ONE)
    permit.settle("failed")
    await env.gate.drain()
    assert env.gate.snapshot().inflight["pro"] == 0
    assert await env.used(PRO) == (0.0,)
