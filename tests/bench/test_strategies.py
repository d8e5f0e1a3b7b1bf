"""The baselines behind the Gate interface, on a FakeClock: each shows exactly the behaviour it
stands for, and nothing of meltguard's (no tiers, no pressure, no quotas)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meltguard.admission.auth import Caller
from meltguard.admission.cost import ImageAsk
from meltguard.admission.events import Decided, Event, Settled, Waited
from meltguard.admission.gate import Gate, Permit
from meltguard.admission.policy import Level, Policy, parse_policy
from meltguard.admission.quota_memory import MemoryQuotaStore
from meltguard.bench.args import STRATEGY_NAMES
from meltguard.clock import FakeClock
from meltguard.daemon.strategies import (
    ENV_BUCKET_BURST,
    ENV_BUCKET_RATE,
    ENV_MAX_CONCURRENT,
    STRATEGIES,
    BaselineGate,
    BaselineOptions,
    FifoSlots,
    TokenBucket,
    make_gate,
)
from meltguard.errors import ErrorCode, ServiceError

FREE = Caller("fiona", "free", False)
PLUS = Caller("paul", "plus", False)
PRO = Caller("petra", "pro", False)
ASK = ImageAsk("a lighthouse")


def policy(limit: int = 2) -> Policy:
    return parse_policy({
        "version": 1,
        "tiers": {
            "free": {"priority": 0, "quotas": [{"limit": 1, "per": "1d"}], "max_queue_wait": "1s"},
            "plus": {"priority": 1},
            "pro": {"priority": 2},
        },
        "concurrency": {"limit": limit},
        "actions": {"high": {"free": {"reject": True}},
                    "critical": {"free": {"reject": True}, "plus": {"reject": True}}},
    })


def build(strategy: str, *, limit: int = 2, **options: Any) -> tuple[Gate, FakeClock, list[Event]]:
    clock = FakeClock()
    events: list[Event] = []
    gate = make_gate(strategy, policy(limit), MemoryQuotaStore(), clock, events.append,
                     options=BaselineOptions(**options))
    return gate, clock, events


def decided(events: list[Event]) -> list[tuple[str, str, str]]:
    return [(e.tier, e.decision, e.reason) for e in events if isinstance(e, Decided)]


def test_the_cli_offers_every_strategy() -> None:
    assert STRATEGY_NAMES == STRATEGIES


def test_meltguard_is_the_real_gate() -> None:
    gate, _, _ = build("meltguard")
    assert type(gate) is Gate


def test_unknown_strategy_and_a_bucket_without_rate_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        build("round-robin")
    with pytest.raises(ValueError, match=ENV_BUCKET_RATE):
        build("token-bucket")


def test_options_come_from_the_environment() -> None:
    options = BaselineOptions.from_env(
        {ENV_BUCKET_RATE: "24.6", ENV_BUCKET_BURST: "6", ENV_MAX_CONCURRENT: "3"})
    assert options == BaselineOptions(bucket_rate=24.6, bucket_burst=6.0,
                                      max_concurrent_requests=3)
    assert BaselineOptions.from_env({}) == BaselineOptions()
    with pytest.raises(ValueError, match=f"{ENV_BUCKET_RATE} must be a number"):
        BaselineOptions.from_env({ENV_BUCKET_RATE: "fast"})
    with pytest.raises(ValueError, match="must be > 0"):
        BaselineOptions.from_env({ENV_BUCKET_RATE: "0"})


async def test_none_admits_everything_in_arrival_order_whatever_the_tier() -> None:
    gate, clock, events = build("none", limit=1)
    gate.set_pressure(Level.CRITICAL, 30.0)  # a baseline does not look at the GPU
    first = await gate.admit(FREE, ASK)
    order: list[str] = []

    async def wait(caller: Caller) -> Permit:
        permit = await gate.admit(caller, ASK)
        order.append(caller.tier)
        return permit

    tasks = [asyncio.create_task(wait(c)) for c in (FREE, PLUS, PRO)]
    await asyncio.sleep(0)
    assert gate.snapshot().queue_depth == {"free": 1, "plus": 1, "pro": 1}
    clock.advance(1.0)
    first.settle("success", seconds=1.0)
    for task in tasks:
        permit = await task
        permit.settle("success", seconds=1.0)
    assert order == ["free", "plus", "pro"]  # FIFO: no tier goes first
    assert decided(events)[0] == ("free", "admit", "ok")
    assert {d[1] for d in decided(events)[1:]} == {"queue"}
    # The free tier's quota of 1 a day does not exist for a baseline either.
    assert all(e.refunded == 0.0 for e in events if isinstance(e, Settled))
    assert gate.snapshot().inflight == {"free": 0, "plus": 0, "pro": 0}


async def test_none_still_validates_requests() -> None:
    gate, _, events = build("none")
    with pytest.raises(ServiceError) as refused:
        await gate.admit(PRO, ImageAsk("x", steps=10_000))
    assert refused.value.code == ErrorCode.INVALID_REQUEST
    assert decided(events) == [("pro", "reject", "invalid_request_error")]


async def test_token_bucket_refuses_beyond_its_rate_and_refills_with_time() -> None:
    gate, clock, events = build("token-bucket", limit=8, bucket_rate=2.0, bucket_burst=3.0)
    permits = [await gate.admit(PRO, ASK) for _ in range(3)]
    with pytest.raises(ServiceError) as refused:
        await gate.admit(PRO, ASK)  # pro too: one static rate for everyone
    err = refused.value
    assert err.code == ErrorCode.RATE_LIMIT_EXCEEDED
    assert err.retry_after == pytest.approx(1.0)  # clamped up from the 0.5 s to the next token
    clock.advance(0.5)
    permits.append(await gate.admit(FREE, ASK))
    assert decided(events)[-2:] == [("pro", "reject", "rate_limit_exceeded"),
                                    ("free", "admit", "ok")]
    for permit in permits:
        permit.settle("success", seconds=0.1)


def test_token_bucket_arithmetic() -> None:
    bucket = TokenBucket(rate=4.0, burst=2.0, now=0.0)
    assert bucket.take(0.0) is None and bucket.take(0.0) is None
    assert bucket.take(0.0) == pytest.approx(0.25)
    assert bucket.take(0.25) is None
    assert bucket.take(100.0) is None and bucket.tokens == pytest.approx(1.0)  # capped at burst
    with pytest.raises(ValueError):
        TokenBucket(rate=0.0, burst=1.0, now=0.0)


async def test_fixed_concurrency_refuses_at_once_with_429_for_every_tier() -> None:
    gate, _, events = build("fixed-concurrency", limit=2)
    held = [await gate.admit(FREE, ASK), await gate.admit(FREE, ASK)]
    with pytest.raises(ServiceError) as refused:
        await gate.admit(PRO, ASK)
    assert refused.value.code == ErrorCode.SERVER_OVERLOADED
    assert gate.overload_status == 429  # TGI's answer
    held.pop().settle("success", seconds=1.0)
    again = await gate.admit(PRO, ASK)
    assert again.waited == 0.0
    assert decided(events)[-2:] == [("pro", "reject", "server_overloaded"),
                                    ("pro", "admit", "ok")]
    snap = gate.snapshot()
    assert snap.concurrency_limit == 2 and snap.max_queue_wait["pro"] == 0.0


async def test_fixed_concurrency_permits_come_from_the_options() -> None:
    gate, _, _ = build("fixed-concurrency", limit=2, max_concurrent_requests=3)
    held = [await gate.admit(PLUS, ASK) for _ in range(3)]
    with pytest.raises(ServiceError):
        await gate.admit(PLUS, ASK)
    for permit in held:
        permit.settle("failed")


async def test_a_client_leaving_the_fifo_queue_leaks_no_slot() -> None:
    gate, _, events = build("none", limit=1)
    running = await gate.admit(PLUS, ASK)
    waiting = asyncio.create_task(gate.admit(PRO, ASK))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert [e for e in events if isinstance(e, Settled)][-1].outcome == "ignored"
    assert any(isinstance(e, Waited) and e.tier == "pro" for e in events)
    running.settle("success", seconds=1.0)
    assert isinstance(gate, BaselineGate)
    nxt = await asyncio.wait_for(gate.admit(FREE, ASK), 1.0)
    assert nxt.waited == 0.0
    nxt.settle("success", seconds=1.0)


async def test_fifo_slots_hand_a_slot_on_when_granted_and_cancelled_at_once() -> None:
    slots = FifoSlots(1)
    assert slots.try_acquire("free")
    waiter = asyncio.create_task(slots.acquire("pro"))
    await asyncio.sleep(0)
    slots.release("free")  # grants the waiter ...
    waiter.cancel()  # ... which leaves before it could run
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.busy == 0 and slots.queued() == 0


async def test_a_policy_reload_resizes_the_fifo() -> None:
    gate, _, _ = build("none", limit=1)
    first = await gate.admit(FREE, ASK)
    second = asyncio.create_task(gate.admit(FREE, ASK))
    await asyncio.sleep(0)
    gate.set_policy(policy(limit=2))
    permit = await asyncio.wait_for(second, 1.0)
    assert gate.snapshot().concurrency_limit == 2
    for p in (first, permit):
        p.settle("success", seconds=1.0)
