"""Every charge has an id of its own, and whatever a client does, a charge stays only with an
image delivered: refused after the charge, failed, dropped or abandoned (in the queue or while
the store call is in flight), it is refunded (or voided before it lands) under that same id."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence

import pytest

from meltguard.admission.events import Decided
from meltguard.admission.gate import Gate
from meltguard.admission.quota_memory import MemoryQuotaStore
from meltguard.clock import FakeClock
from meltguard.errors import ErrorCode, Refused, ServiceError
from meltguard.values import QuotaOutcome, QuotaWindow
from tests.admission.test_gate import FREE, ONE, PRO, Env, NoTimers, make_policy


class RecordingStore:
    """The memory store behind the QuotaStore Protocol, recording each call's charge id."""

    name = "recording"

    def __init__(self) -> None:
        self.inner = MemoryQuotaStore()
        self.calls: list[tuple[str, str | None]] = []

    async def consume(self, windows: Sequence[QuotaWindow], cost: float, now: float, *,
                      charge_id: str | None = None) -> QuotaOutcome:
        self.calls.append(("consume", charge_id))
        return await self.inner.consume(windows, cost, now, charge_id=charge_id)

    async def refund(self, windows: Sequence[QuotaWindow], cost: float, charged_at: float, *,
                     charge_id: str | None = None) -> None:
        self.calls.append(("refund", charge_id))
        await self.inner.refund(windows, cost, charged_at, charge_id=charge_id)

    async def peek(self, windows: Sequence[QuotaWindow], now: float) -> QuotaOutcome:
        return await self.inner.peek(windows, now)

    async def close(self) -> None:
        await self.inner.close()


class LostReplyStore(RecordingStore):
    """A consume that lands in the store but whose answer never comes back (a timeout)."""

    async def consume(self, windows: Sequence[QuotaWindow], cost: float, now: float, *,
                      charge_id: str | None = None) -> QuotaOutcome:
        await super().consume(windows, cost, now, charge_id=charge_id)
        raise TimeoutError("no answer from the store")


async def test_decide_returns_a_refusal_and_admit_raises_it() -> None:
    env = Env()
    for _ in range(2):
        (await env.gate.admit(FREE, ONE)).settle("success")
    refusal = await env.gate.decide(FREE, ONE)
    assert isinstance(refusal, Refused) and refusal.code is ErrorCode.RATE_LIMIT_EXCEEDED
    assert refusal.quota is not None and not refusal.quota.allowed
    with pytest.raises(ServiceError) as raised:
        await env.gate.admit(FREE, ONE)
    assert raised.value.code is ErrorCode.RATE_LIMIT_EXCEEDED


async def test_each_charge_is_refunded_under_its_own_id() -> None:
    store = RecordingStore()
    env = Env(store=store)
    kept = await env.gate.admit(PRO, ONE)
    failed = await env.gate.admit(PRO, ONE)
    kept.settle("success")
    failed.settle("failed")
    await env.gate.drain()
    [(_, first), (_, second), (kind, refunded)] = store.calls
    assert first and second and first != second
    assert (kind, refunded) == ("refund", second)
    assert await env.used(PRO) == (1.0,)


async def test_every_refusal_asks_the_store_so_a_refund_elsewhere_counts_at_once() -> None:
    store = RecordingStore()
    env = Env(store=store)
    for _ in range(2):
        (await env.gate.admit(FREE, ONE)).settle("success")
    assert isinstance(await env.gate.decide(FREE, ONE), Refused)
    # Another daemon sharing the store gives one image back.
    windows = [s.window for s in (await env.gate.quota_status(FREE)).windows]
    await store.refund(windows, 1.0, env.clock.wall())
    admitted = await env.gate.decide(FREE, ONE)
    assert not isinstance(admitted, Refused)
    admitted.settle("success")
    assert [kind for kind, _ in store.calls].count("consume") == 4


async def test_a_failed_consume_is_left_to_the_store_chain_and_costs_one_call() -> None:
    # Whether a consume that raised landed is for the store chain to settle by its id (it
    # knows whether the call could have been applied); the gate makes no second call.
    store = LostReplyStore()
    env = Env(make_policy(on_store_error="closed"), store=store)
    refusal = await env.gate.decide(PRO, ONE)
    assert isinstance(refusal, Refused)
    assert refusal.code is ErrorCode.QUOTA_STORE_UNAVAILABLE
    await env.gate.drain()
    assert [kind for kind, _ in store.calls] == ["consume"]


class SlowStore:
    """The memory store behind a network of random delays (in event-loop turns, not time).
    A call travels to the store, is applied there whether or not its caller is still waiting
    (a request that reached the server runs), and its answer travels back."""

    name = "slow"

    def __init__(self, rng: random.Random) -> None:
        self.inner = MemoryQuotaStore()
        self.rng = rng
        self.landing: set[asyncio.Task[object]] = set()

    async def _travel(self) -> None:
        for _ in range(self.rng.randrange(4)):
            await asyncio.sleep(0)

    async def _at_the_store(self, call: Callable[[], Awaitable[object]]) -> object:
        await self._travel()
        return await call()

    async def _call(self, call: Callable[[], Awaitable[object]]) -> object:
        await self._travel()
        task = asyncio.ensure_future(self._at_the_store(call))
        self.landing.add(task)
        try:
            return await asyncio.shield(task)
        finally:
            await self._travel()

    async def consume(self, windows: Sequence[QuotaWindow], cost: float, now: float, *,
                      charge_id: str | None = None) -> QuotaOutcome:
        outcome = await self._call(
            lambda: self.inner.consume(windows, cost, now, charge_id=charge_id))
        assert isinstance(outcome, QuotaOutcome)
        return outcome

    async def refund(self, windows: Sequence[QuotaWindow], cost: float, charged_at: float, *,
                     charge_id: str | None = None) -> None:
        await self._call(lambda: self.inner.refund(windows, cost, charged_at, charge_id=charge_id))

    async def peek(self, windows: Sequence[QuotaWindow], now: float) -> QuotaOutcome:
        return await self.inner.peek(windows, now)

    async def close(self) -> None:
        await self.inner.close()


@pytest.mark.parametrize("seed", range(8))
async def test_clients_leaving_at_random_points_are_charged_exactly_what_was_delivered(
    seed: int,
) -> None:
    rng = random.Random(seed)
    store = SlowStore(rng)
    clock = FakeClock(start=3600.0)
    decided: list[Decided] = []
    gate = Gate(make_policy(), store, clock,
                lambda e: decided.append(e) if isinstance(e, Decided) else None,
                random.Random(seed), call_later=NoTimers())
    delivered = 0.0

    async def request() -> None:
        nonlocal delivered
        permit = await gate.admit(PRO, ONE)
        async with permit:
            for _ in range(rng.randrange(6)):
                await asyncio.sleep(0)
            permit.settle("success", seconds=0.0)
        delivered += permit.cost

    tasks = [asyncio.create_task(request()) for _ in range(200)]
    for task in tasks:
        if rng.random() < 0.5:
            continue  # this client waits for its image
        for _ in range(rng.randrange(12)):
            await asyncio.sleep(0)
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await gate.drain()
    while store.landing:
        await asyncio.gather(*store.landing)
        store.landing = {t for t in store.landing if not t.done()}
    windows = (await gate.quota_status(PRO)).windows
    charged = windows[0].used
    assert 0 < delivered < 200
    assert charged == pytest.approx(delivered)
    assert gate.snapshot().inflight["pro"] == 0 and gate.snapshot().queue_depth["pro"] == 0
