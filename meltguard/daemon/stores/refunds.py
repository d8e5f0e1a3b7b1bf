"""Durable refunds: a refund the store could not take is kept and retried until it can.

`RefundingStore` wraps any QuotaStore:

- `refund()` is tried on the store at once when nothing is waiting (so a client retrying at
  once finds its quota back); when that fails, or refunds are already waiting, it is queued
  and `refund()` returns without raising. A background task retries the queue with jittered
  exponential backoff (50 ms doubling to 5 s) until the store takes each refund, so a store
  that is frozen, down or restarting gets them once it answers again.
- A consume whose answer never came (a timeout, a lost connection, the caller cancelled while
  it was on the wire) may or may not have been charged. With a charge id it is voided: a
  refund with the same id is queued, which gives the charge back if it landed, or leaves a
  tombstone so that a consume still in flight charges nothing when it lands. (Not when the
  store's error says `maybe_applied=False`: a rolled-back SQLite transaction, a refused
  connection.)
- Refunds carry the charge id, so a retry whose first try landed after all gives back once.
  A refund without an id (dev harnesses) is retried too; a retry after a timeout may then
  give back twice (never below zero).
- Bounded: at most `max_pending` refunds wait; past that the oldest waiting void makes room
  for a refund, and otherwise the new one is dropped, counted and logged. The queue lives in
  the process: it outlives a store restart, not a daemon restart.
- `close()` drains the queue for up to `drain_timeout` seconds before closing the store; what
  is left is counted as abandoned and logged with its total cost.

Counted in `refunds_total[result]` (`success`, `retry`, `dropped`, `abandoned`) and `pending`;
`quota.refunded` is logged only when the store took a refund. The wrapper also tracks whether
the store's last call worked (`health`), for `/readyz` and `meltguard_quota_store_up`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from meltguard.protocols import QuotaStore
from meltguard.values import QuotaOutcome, QuotaWindow

log = structlog.get_logger("meltguard")

RESULTS = ("success", "retry", "dropped", "abandoned")
MAX_PENDING = 100_000
BACKOFF_MIN = 0.05
BACKOFF_MAX = 5.0
DRAIN_TIMEOUT = 5.0
# One attempt never waits longer than this, whatever the store's own deadline says.
ATTEMPT_TIMEOUT = 5.0
# Refunds sent to the store together when it is healthy (a SQLite batch, a Redis pipeline's
# worth of round trips in flight).
BATCH = 64


@dataclass(slots=True, eq=False)
class PendingRefund:
    windows: tuple[QuotaWindow, ...]
    cost: float
    charged_at: float
    charge_id: str | None
    void: bool  # a consume whose answer never came, given back if it was charged
    attempts: int = 0
    done: bool = False  # the store took it


@dataclass(slots=True)
class StoreHealth:
    """Whether the store's last call worked, and the error if not (no secrets: store errors
    carry redacted URLs)."""

    ok: bool = True
    error: str | None = None
    since: float = field(default_factory=time.time)

    def record(self, error: BaseException | None) -> None:
        if error is None and self.ok:
            return  # every healthy call: nothing changes
        ok = error is None
        if ok != self.ok:
            self.since = time.time()
        self.ok = ok
        self.error = None if error is None else f"{type(error).__name__}: {error}"


class RefundingStore:
    """A QuotaStore whose refunds are never lost to a store outage (see the module doc)."""

    def __init__(
        self,
        inner: QuotaStore,
        *,
        max_pending: int = MAX_PENDING,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
        drain_timeout: float = DRAIN_TIMEOUT,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.inner = inner
        self.health = StoreHealth()
        self.refunds_total: dict[str, int] = dict.fromkeys(RESULTS, 0)
        self._queue: deque[PendingRefund] = deque()
        self._in_flight: list[PendingRefund] = []
        self._max_pending = max_pending
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._drain_timeout = drain_timeout
        self._sleep = sleep
        self._rng = rng
        self._worker: asyncio.Task[None] | None = None
        self._direct = 0  # refunds being tried by their caller, not by the worker
        self._no_direct = asyncio.Event()
        self._no_direct.set()
        self._closed = False
        self._finished = False  # closed and drained: the store is gone

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def pending(self) -> int:
        """Refunds the store has not taken yet (queued or being tried)."""
        return len(self._queue) + len(self._in_flight)

    def __getattr__(self, attr: str) -> Any:
        # ping(), url, path ...: whatever the store offers beyond the Protocol. (`inner`
        # itself is looked up here only on an object built without __init__: copy, pickle.)
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    async def ping(self) -> None:
        ping = getattr(self.inner, "ping", None)
        if ping is None:
            return
        try:
            await ping()
        except Exception as exc:
            self.health.record(exc)
            raise
        self.health.record(None)
        if self._queue:
            self._wake()

    async def consume(
        self,
        windows: Sequence[QuotaWindow],
        cost: float,
        now: float,
        *,
        charge_id: str | None = None,
    ) -> QuotaOutcome:
        try:
            outcome = await self.inner.consume(windows, cost, now, charge_id=charge_id)
        except asyncio.CancelledError:
            # The caller left while the charge was on its way: it may land, and nobody will
            # receive what it pays for.
            if charge_id is not None:
                self._enqueue(PendingRefund(tuple(windows), cost, now, charge_id, void=True))
            raise
        except Exception as exc:
            self.health.record(exc)
            if charge_id is not None and getattr(exc, "maybe_applied", True):
                self._enqueue(PendingRefund(tuple(windows), cost, now, charge_id, void=True))
            raise
        self.health.record(None)
        if self._queue:
            self._wake()
        return outcome

    async def refund(
        self,
        windows: Sequence[QuotaWindow],
        cost: float,
        charged_at: float,
        *,
        charge_id: str | None = None,
    ) -> None:
        entry = PendingRefund(tuple(windows), cost, charged_at, charge_id, void=False)
        if self._queue or self._closed:
            # Others are waiting: the store is failing, or this one would overtake them.
            self._enqueue(entry)
            return
        self._in_flight.append(entry)
        self._direct += 1
        self._no_direct.clear()
        try:
            await self._attempt(entry)
        except asyncio.CancelledError:
            self._in_flight.remove(entry)
            self._enqueue(entry)
            raise
        except Exception:
            self._in_flight.remove(entry)
            self._enqueue(entry)
            return
        finally:
            self._direct -= 1
            if not self._direct:
                self._no_direct.set()
        self._in_flight.remove(entry)

    async def peek(self, windows: Sequence[QuotaWindow], now: float) -> QuotaOutcome:
        try:
            outcome = await self.inner.peek(windows, now)
        except Exception as exc:
            self.health.record(exc)
            raise
        self.health.record(None)
        if self._queue:
            self._wake()
        return outcome

    async def close(self) -> None:
        """Drain what waits (up to drain_timeout), then close the store."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_timeout
        # Refunds being tried directly finish first (or join the queue when they fail).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_direct.wait(), self._drain_timeout)
        if self._queue:
            self._wake()
        worker = self._worker
        if worker is not None:
            try:
                await asyncio.wait_for(asyncio.shield(worker),
                                       max(0.0, deadline - loop.time()))
            except TimeoutError:
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker
        left = list(self._queue) + self._in_flight
        if left:
            self.refunds_total["abandoned"] += len(left)
            log.error("quota.refunds_abandoned", store=self.name, count=len(left),
                      cost=round(sum(e.cost for e in left), 4),
                      error=self.health.error, drain_timeout_s=self._drain_timeout)
            self._queue.clear()
            self._in_flight.clear()
        self._finished = True
        await self.inner.close()

    # -- the queue ----------------------------------------------------------------------------

    def _enqueue(self, entry: PendingRefund) -> None:
        if self._finished:
            # The store is closed: nothing will take this one any more.
            self.refunds_total["abandoned"] += 1
            log.error("quota.refunds_abandoned", store=self.name, count=1,
                      cost=round(entry.cost, 4), error="the store is closed",
                      drain_timeout_s=self._drain_timeout)
            return
        if self.pending >= self._max_pending and not entry.void:
            # A refund of a charge that surely landed is worth more than a void of one that
            # may never have: make room by dropping the oldest void, if any waits.
            oldest_void = next((e for e in self._queue if e.void), None)
            if oldest_void is not None:
                self._queue.remove(oldest_void)
                self._drop(oldest_void)
        if self.pending >= self._max_pending:
            self._drop(entry)
            return
        self._queue.append(entry)
        self._wake()

    def _drop(self, entry: PendingRefund) -> None:
        self.refunds_total["dropped"] += 1
        log.error("quota.refund_dropped", store=self.name, cost=round(entry.cost, 4),
                  charge_id=entry.charge_id, void=entry.void, pending=self.pending,
                  max_pending=self._max_pending)

    def _wake(self) -> None:
        if self._worker is None or self._worker.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (a store used synchronously): the next call starts it
            # A context of its own: its log lines must not carry the request id of whichever
            # request happened to start it.
            self._worker = loop.create_task(self._work(), name="meltguard-refunds",
                                            context=contextvars.Context())

    async def _work(self) -> None:
        delay = self._backoff_min
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            self._in_flight.extend(batch)
            try:
                results = await asyncio.gather(
                    *(self._attempt(e) for e in batch), return_exceptions=True
                )
            except asyncio.CancelledError:
                self._requeue(batch)
                raise
            failed = [e for e, r in zip(batch, results, strict=True) if r is not None]
            for e in batch:
                self._in_flight.remove(e)
            self._queue.extendleft(reversed(failed))
            if not failed:
                delay = self._backoff_min
                continue
            # Full jitter within [delay/2, delay]: replicas that lost one store do not all
            # come back to it in the same millisecond.
            await self._sleep(delay * (0.5 + self._rng() / 2))
            delay = min(delay * 2, self._backoff_max)

    def _requeue(self, batch: list[PendingRefund]) -> None:
        for e in batch:
            if e in self._in_flight:
                self._in_flight.remove(e)
        self._queue.extendleft(reversed([e for e in batch if not e.done]))

    async def _attempt(self, entry: PendingRefund) -> None:
        entry.attempts += 1
        try:
            async with asyncio.timeout(ATTEMPT_TIMEOUT):
                await self.inner.refund(entry.windows, entry.cost, entry.charged_at,
                                        charge_id=entry.charge_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.health.record(exc)
            self.refunds_total["retry"] += 1
            if entry.attempts == 1:
                log.warning("quota.refund_deferred", store=self.name,
                            charge_id=entry.charge_id, void=entry.void, error=str(exc))
            raise
        entry.done = True
        self.health.record(None)
        self.refunds_total["success"] += 1
        log.info("quota.refunded", store=self.name, cost=round(entry.cost, 4),
                 charge_id=entry.charge_id, void=entry.void, attempts=entry.attempts)
