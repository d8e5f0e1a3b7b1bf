"""The concurrency queue in front of the GPU: how many jobs run at once and who goes next.

Limit. `policy.concurrency.limit` slots, adjusted by AIMD (TCP's rule, as in Netflix
concurrency-limits): a job dropped for lack of GPU memory halves the limit (never below
`min_limit`); every success adds 1/limit back, so about one slot per `limit` successes,
up to the policy's limit. Out-of-memory is the one overload signal a GPU gives reliably, and
halving reacts to it at once while the slow climb probes back without oscillating.

Caps. A tier may hold max(1, floor(limit x concurrency_factor)) slots at the current pressure
level; a tenant may hold its tier's `max_concurrent`.

Pace. With a duty budget (`set_duty_budget`, from the pressure assessment's thermal model:
the busy share at which the card's predicted settling temperature sits on the policy's hold
line), grants are also paced like a token bucket of GPU-seconds: each grant spends its cost x
the engine's measured seconds per cost (timed between completions, not per request, whose
latency includes waiting behind the other slot), the bucket refills at the budget, and at
most half a reference image is banked. This is what holds a card at its edge rather than
under it: the level thresholds react after the fact, pacing keeps the heat put in equal to
what the card sheds at the line.

Reservations. A tier with `min_share` reserves that share of the admitted GPU work (Kubernetes
APF's assured shares, LiteLLM's priority_reservation): every grant adds the tier's share of
its cost to what the tier is owed, every grant to the tier takes its cost off, and a tier
that is owed more than nothing goes before priority order. So while it asks it is never
behind by more than a request, and at most one request ahead. What it is owed (or owes)
stops at RESERVE_CAP_COST either way: what it did not ask for is borrowed by the others and
never paid back in a burst, and what it took while nobody else asked is not held against it.

Order. Among waiters that could start now (within the global, tier and tenant caps), a tier
owed its reservation goes first, then the highest-priority tier; within a tier, tenants take
turns (round robin), and each tenant's own requests run in arrival order. A waiter blocked
only by its own tier or tenant cap does not hold back lower tiers: the slot would sit idle
otherwise (work conserving).

Time. Deadlines come from the injected Clock, which is authoritative: a loop timer
(`call_later`, real time) only wakes the scheduler up, and a waiter times out only once
`clock.monotonic()` has passed its deadline. Every call into the scheduler also expires
overdue waiters first, so tests on a FakeClock advance the clock and then act (or call
`expire_due()`), and never sleep.

Cancellation. A waiter whose task is cancelled leaves the queue; if it was granted a slot in
the same instant, that slot is released, so nothing leaks.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from meltguard.admission.policy import Level, Policy
from meltguard.protocols import Clock

# Weight of the newest sample in the service-time average: about the last five jobs count.
EWMA_ALPHA = 0.2
# Most GPU time the pacing bucket banks, in reference images: half a job, so that a card
# coming up to its hold line is not handed a whole job's heat beyond its budget.
PACE_BURST_COST = 0.5
_PACE_SLACK = 1e-6
# Most a reserved tier is owed while it asks for nothing, and most it owes back for being served
# ahead, in reference images: one request.
RESERVE_CAP_COST = 1.0


class Cancellable(Protocol):
    def cancel(self) -> None: ...


CallLater = Callable[[float, Callable[[], None]], Cancellable]


class QueueTimeout(Exception):
    """The waiter's deadline passed before a slot came free."""

    def __init__(self, waited: float) -> None:
        super().__init__(f"no slot within {waited:.3f} s")
        self.waited = waited


class Shed(Exception):
    """The waiter's tier stopped being served (its tier is shed at the new pressure level)
    while it waited."""

    def __init__(self, waited: float) -> None:
        super().__init__(f"shed after {waited:.3f} s in the queue")
        self.waited = waited


@dataclass(frozen=True, slots=True)
class TierRule:
    priority: int
    concurrency_factor: float
    tenant_cap: int
    min_share: float = 0.0


_QUEUED, _GRANTED, _EXPIRED, _GONE = range(4)


class _Waiter:
    __slots__ = (
        "cost", "deadline", "enqueued_at", "future", "slot", "state", "tenant", "tier", "timer",
    )

    def __init__(
        self, tier: str, tenant: str, cost: float, enqueued_at: float,
        future: asyncio.Future[None],
    ) -> None:
        self.tier = tier
        self.tenant = tenant
        self.cost = cost
        self.enqueued_at = enqueued_at
        self.future = future
        self.deadline: float | None = None
        self.timer: Cancellable | None = None
        self.state = _QUEUED
        self.slot: Slot | None = None


class Slot:
    """One granted place on the GPU. `release()` gives it back; a second call does nothing."""

    __slots__ = ("_released", "_scheduler", "cost", "tenant", "tier", "waited")

    def __init__(
        self, scheduler: Scheduler, tier: str, tenant: str, cost: float, waited: float
    ) -> None:
        self._scheduler = scheduler
        self.tier = tier
        self.tenant = tenant
        self.cost = cost
        self.waited = waited
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._scheduler._release(self)


class Scheduler:
    def __init__(
        self,
        policy: Policy,
        clock: Clock,
        *,
        level: Level = Level.NORMAL,
        call_later: CallLater | None = None,
    ) -> None:
        self._clock = clock
        self._call_later = call_later
        self._policy = policy
        self._level = level
        self._limit = float(policy.concurrency.limit)
        self._ewma: float | None = None
        # tier -> tenant -> waiters; dict order is the round-robin turn order of tenants.
        self._queues: dict[str, dict[str, deque[_Waiter]]] = {}
        self._depth: dict[str, int] = {}
        self._queued = 0  # waiters in every queue together
        self._queued_cost = 0.0
        self._tier_inflight: dict[str, int] = {}
        self._tenant_inflight: dict[str, int] = {}
        self._inflight = 0
        self._deadlines: list[tuple[float, int, _Waiter]] = []
        self._seq = itertools.count()
        self._rules: dict[str, TierRule] = {}
        self._order: tuple[str, ...] = ()
        # The limit and tier caps as integers, recomputed when the limit or the rules change:
        # every admission reads them.
        self._slots = 1
        self._tier_caps: dict[str, int] = {}
        # Pacing (see the module docstring): busy-seconds per second, None when unpaced.
        self._duty: float | None = None
        # Engine time per cost, measured between completions (see record_success): what a
        # grant spends of the pacing bucket. A job's latency is no measure of it, since with
        # two slots it includes waiting behind the other job.
        self._busy_ewma: float | None = None
        self._last_done: float | None = None
        self._tokens = 0.0
        self._tokens_at = clock.monotonic()
        self._pace_timer: Cancellable | None = None
        # Reservations: cost each min_share tier is owed (positive) while it has waiters.
        self._owed: dict[str, float] = {}
        self._recompute_rules()

    # -- configuration ---------------------------------------------------------------------

    def set_policy(self, policy: Policy) -> None:
        old_limit = self._policy.concurrency.limit
        self._policy = policy
        new = policy.concurrency
        if self._limit >= old_limit:
            # Not backing off: follow the new ceiling, up or down.
            self._limit = float(new.limit)
        else:
            self._limit = min(max(self._limit, float(new.min_limit)), float(new.limit))
        self._recompute_rules()
        self._dispatch()

    def set_level(self, level: Level) -> None:
        if level == self._level:
            return
        self._level = level
        self._recompute_rules()
        self._dispatch()

    def set_duty_budget(self, duty: float | None) -> None:
        """The share of time the GPU may be busy (None: no pacing); see "Pace" above."""
        now = self._clock.monotonic()
        self._refill(now)
        if duty is not None and not math.isfinite(duty):
            duty = None
        if duty is None and self._duty is not None:
            self._tokens = 0.0
        self._duty = None if duty is None else max(duty, 1e-6)
        self._dispatch()

    @property
    def duty_budget(self) -> float | None:
        return self._duty

    def _refill(self, now: float) -> None:
        if self._duty is not None and self._busy_ewma is not None:
            cap = PACE_BURST_COST * self._busy_ewma
            self._tokens = min(cap, self._tokens + self._duty * max(now - self._tokens_at, 0.0))
        self._tokens_at = now

    def _paced_out(self) -> bool:
        """Whether pacing holds the next grant back now."""
        if self._duty is None or self._busy_ewma is None:
            return False
        self._refill(self._clock.monotonic())
        # A hair of tolerance: a timer armed for exactly the refill time must find it done,
        # whatever float rounding made of the sum.
        return self._tokens < -_PACE_SLACK

    def _arm_pace_timer(self) -> None:
        if self._pace_timer is not None or self._duty is None:
            return
        delay = max(-self._tokens / self._duty, _PACE_SLACK)
        try:
            call_later = self._call_later or asyncio.get_running_loop().call_later
        except RuntimeError:
            return  # no loop (a synchronous caller): the next call into the scheduler retries
        self._pace_timer = call_later(max(delay, 0.0), self._on_pace_timer)

    def _on_pace_timer(self) -> None:
        self._pace_timer = None
        self.expire_due()
        self._dispatch()

    def _spend(self, tier: str, cost: float) -> None:
        """Book a grant: the pacing bucket and every reservation."""
        if self._duty is not None and self._busy_ewma is not None:
            self._tokens -= cost * self._busy_ewma
        for name, rule in self._rules.items():
            if rule.min_share > 0.0:
                self._owed[name] = min(self._owed.get(name, 0.0) + rule.min_share * cost,
                                       RESERVE_CAP_COST)
        if tier in self._owed:
            # Served beyond its share while nobody else asked is borrowing, not an advance.
            self._owed[tier] = max(self._owed[tier] - cost, -RESERVE_CAP_COST)

    def owed(self, tier: str) -> float:
        """Cost the tier's reservation is owed now (<= 0: it has had its share)."""
        return self._owed.get(tier, 0.0)

    def _recompute_rules(self) -> None:
        rules: dict[str, TierRule] = {}
        for name in self._policy.tiers:
            eff = self._policy.effective(name, self._level)
            rules[name] = TierRule(eff.priority, eff.concurrency_factor, eff.max_concurrent,
                                   self._policy.tiers[name].min_share)
        # A tier dropped by a reload keeps its last rule while it still has work here.
        for name, rule in self._rules.items():
            if name not in rules and (self._depth.get(name) or self._tier_inflight.get(name)):
                rules[name] = rule
        self._rules = rules
        self._order = tuple(sorted(rules, key=lambda name: -rules[name].priority))
        self._recompute_caps()

    def _recompute_caps(self) -> None:
        floor = self._policy.concurrency.min_limit
        self._slots = slots = max(floor, math.floor(self._limit + 1e-9))
        self._tier_caps = {
            name: max(1, math.floor(slots * rule.concurrency_factor + 1e-9))
            for name, rule in self._rules.items()
        }

    # -- readings ----------------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """Slots that may be in flight now (the AIMD value, floored)."""
        return self._slots

    @property
    def limit_value(self) -> float:
        return self._limit

    @property
    def service_seconds_per_cost(self) -> float | None:
        """Measured seconds per reference image (EWMA); None before the first success."""
        return self._ewma

    @property
    def inflight_total(self) -> int:
        return self._inflight

    def tier_cap(self, tier: str) -> int:
        return self._tier_caps[tier]

    def _reported_tiers(self) -> tuple[str, ...]:
        # A tier dropped by a reload is reported only while it still has work here.
        return tuple(
            name for name in self._order
            if name in self._policy.tiers
            or self._depth.get(name) or self._tier_inflight.get(name)
        )

    def queue_depth(self) -> dict[str, int]:
        return {name: self._depth.get(name, 0) for name in self._reported_tiers()}

    def inflight(self) -> dict[str, int]:
        return {name: self._tier_inflight.get(name, 0) for name in self._reported_tiers()}

    def pending(self) -> tuple[tuple[str, str], ...]:
        """(tier, tenant) of every queued waiter, highest tier first, then turn order."""
        return tuple(
            (tier, waiter.tenant)
            for tier in self._order
            for waiters in self._queues.get(tier, {}).values()
            for waiter in waiters
            if waiter.state == _QUEUED
        )

    def can_start(self, tier: str, tenant: str) -> bool:
        """Whether a job of this tier and tenant fits every cap right now."""
        rule = self._rules.get(tier)
        return (
            rule is not None
            and self._inflight < self._slots
            and self._tier_inflight.get(tier, 0) < self._tier_caps[tier]
            and self._tenant_inflight.get(tenant, 0) < rule.tenant_cap
        )

    def estimate_wait(self, tier: str, cost: float) -> float | None:
        """Seconds a newcomer of `tier` costing `cost` would wait, or None before any
        measurement (then nothing is refused on an estimate).

        (waiters of the same or a higher priority + in-flight overflow) x service time of
        this job / limit: each of those must start before the newcomer, and `limit` of them
        run side by side. Overflow counts the in-flight jobs beyond the free slots, so a full
        GPU with an empty queue still means waiting for one job to finish."""
        if self._ewma is None:
            return None
        ahead = 0
        if self._queued:
            rule = self._rules.get(tier)
            priority = rule.priority if rule is not None else -math.inf
            ahead = sum(
                self._depth.get(name, 0)
                for name, other in self._rules.items()
                if other.priority >= priority
            )
        limit = self._slots
        overflow = max(0, self._inflight - limit + 1)
        wait = (ahead + overflow) * self._ewma * cost / limit
        busy = self._busy_ewma
        if self._duty is not None and busy is not None:
            # Paced: the work ahead drains at the budget, less what the bucket has banked.
            self._refill(self._clock.monotonic())
            wait = max(wait, (ahead * busy * cost - self._tokens) / self._duty)
        rule = self._rules.get(tier)
        if rule is not None and rule.min_share > 0.0:
            # A reserved tier waits for its own queue and for what it got ahead to be earned
            # back, both at its share of the rate; then for a slot.
            paced = self._duty is not None and busy is not None
            rate = (self._duty if paced and self._duty else float(limit)) * rule.min_share
            per_cost = busy if paced and busy is not None else self._ewma
            behind = self._depth.get(tier, 0) * cost + max(-self.owed(tier), 0.0)
            reserved = behind * per_cost / rate + overflow * self._ewma * cost / limit
            wait = min(wait, reserved)
        return wait

    def drain_estimate(self) -> float:
        """Seconds until everything queued now has started (0 before any measurement)."""
        if self._ewma is None:
            return 0.0
        work = max(self._queued_cost, 0.0) * self._ewma
        if self._duty is not None and self._busy_ewma is not None:
            return max(work / self.limit, self._queued_cost * self._busy_ewma / self._duty)
        return work / self.limit

    # -- feedback ----------------------------------------------------------------------------

    def record_success(self, seconds: float | None, cost: float) -> None:
        if seconds is not None and seconds >= 0 and cost > 0:
            sample = seconds / cost
            self._ewma = sample if self._ewma is None else (
                self._ewma + EWMA_ALPHA * (sample - self._ewma)
            )
            # The engine's own time for this job: from when it could start (its grant, or the
            # previous completion if that came later) to now. Exact for a serial engine; for a
            # batching one it is the time per job of its throughput, which is what pacing
            # spends.
            now = self._clock.monotonic()
            began = now - seconds
            if self._last_done is not None:
                began = max(began, self._last_done)
            self._last_done = now
            busy = max(now - began, 0.0) / cost
            self._busy_ewma = busy if self._busy_ewma is None else (
                self._busy_ewma + EWMA_ALPHA * (busy - self._busy_ewma)
            )
        ceiling = float(self._policy.concurrency.limit)
        if self._limit < ceiling:
            self._limit = min(ceiling, self._limit + 1.0 / max(self._limit, 1.0))
            self._recompute_caps()
            self._dispatch()

    def record_drop(self) -> None:
        self._limit = max(float(self._policy.concurrency.min_limit), self._limit / 2.0)
        self._recompute_caps()

    # -- waiting -----------------------------------------------------------------------------

    def try_acquire(self, tier: str, tenant: str, cost: float) -> Slot | None:
        """A slot at once when nobody is queued and every cap has room, else None (then
        `acquire` queues). With an empty queue this is exactly the grant `acquire` would make
        without suspending, minus the waiter, the future and the deadline timer."""
        if self._queued:
            return None
        rule = self._rules.get(tier)
        if rule is None or self._inflight >= self._slots or self._paced_out():
            return None
        in_tier = self._tier_inflight.get(tier, 0)
        in_tenant = self._tenant_inflight.get(tenant, 0)
        if in_tier >= self._tier_caps[tier] or in_tenant >= rule.tenant_cap:
            return None
        self._inflight += 1
        self._tier_inflight[tier] = in_tier + 1
        self._tenant_inflight[tenant] = in_tenant + 1
        self._spend(tier, cost)
        return Slot(self, tier, tenant, cost, 0.0)

    async def acquire(
        self, tier: str, tenant: str, cost: float, max_wait: float | None
    ) -> Slot:
        """Wait for a slot, at most `max_wait` seconds on the clock (None: no deadline).
        Raises QueueTimeout; cancellation leaves the queue without leaking a slot."""
        if tier not in self._rules:
            raise KeyError(f"unknown tier {tier!r}")
        self.expire_due()
        now = self._clock.monotonic()
        waiter = _Waiter(tier, tenant, cost, now, asyncio.get_running_loop().create_future())
        self._queues.setdefault(tier, {}).setdefault(tenant, deque()).append(waiter)
        self._depth[tier] = self._depth.get(tier, 0) + 1
        self._queued += 1
        self._queued_cost += cost
        if max_wait is not None:
            waiter.deadline = now + max(max_wait, 0.0)
            heapq.heappush(self._deadlines, (waiter.deadline, next(self._seq), waiter))
        self._dispatch()
        if waiter.state == _GRANTED and waiter.slot is not None:
            # Granted without suspending: no wait, whatever a real clock ticked meanwhile.
            waiter.slot.waited = 0.0
        elif waiter.state == _QUEUED and waiter.deadline is not None:
            if waiter.deadline <= now:
                self._expire(waiter, now)
            else:
                self._arm_timer(waiter, waiter.deadline - now)
        try:
            await waiter.future  # returns at once when already granted or expired
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        assert waiter.slot is not None
        return waiter.slot

    def shed(self, tier: str) -> int:
        """Turn away everyone waiting in `tier` (each waiter raises Shed); returns how many."""
        tenants = self._queues.get(tier)
        if not tenants:
            return 0
        now = self._clock.monotonic()
        waiters = [w for queue in tenants.values() for w in queue if w.state == _QUEUED]
        for waiter in waiters:
            self._unqueue(waiter)
            waiter.state = _EXPIRED  # like a timeout: the future holds the reason
            if not waiter.future.done():
                waiter.future.set_exception(Shed(now - waiter.enqueued_at))
        # Another tier's waiter may have stood behind this tier's turn for a tenant cap.
        self._dispatch()
        return len(waiters)

    def expire_due(self) -> int:
        """Time out every waiter whose deadline has passed on the clock; returns how many."""
        now = self._clock.monotonic()
        expired = 0
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, waiter = heapq.heappop(self._deadlines)
            if waiter.state == _QUEUED:
                self._expire(waiter, now)
                expired += 1
        return expired

    def _arm_timer(self, waiter: _Waiter, delay: float) -> None:
        call_later = self._call_later or asyncio.get_running_loop().call_later
        waiter.timer = call_later(delay, lambda: self._on_timer(waiter))

    def _on_timer(self, waiter: _Waiter) -> None:
        waiter.timer = None
        if waiter.state != _QUEUED or waiter.deadline is None:
            return
        remaining = waiter.deadline - self._clock.monotonic()
        if remaining > 0:
            # The loop's clock ran ahead of ours (a fake clock, or timer rounding): wait more.
            self._arm_timer(waiter, remaining)
            return
        self.expire_due()

    def _expire(self, waiter: _Waiter, now: float) -> None:
        self._unqueue(waiter)
        waiter.state = _EXPIRED
        if not waiter.future.done():
            waiter.future.set_exception(QueueTimeout(now - waiter.enqueued_at))

    def _abandon(self, waiter: _Waiter) -> None:
        if waiter.state == _EXPIRED and waiter.future.done() and not waiter.future.cancelled():
            waiter.future.exception()  # retrieved, so asyncio does not log it as lost
        elif waiter.state == _GRANTED and waiter.slot is not None:
            waiter.slot.release()
        elif waiter.state == _QUEUED:
            self._unqueue(waiter)
            waiter.state = _GONE
            self._dispatch()  # it may have been the head that held its tenant's turn

    def _unqueue(self, waiter: _Waiter) -> None:
        tenants = self._queues.get(waiter.tier)
        waiters = tenants.get(waiter.tenant) if tenants else None
        if tenants is not None and waiters is not None:
            try:
                waiters.remove(waiter)
            except ValueError:
                pass
            else:
                self._depth[waiter.tier] -= 1
                self._queued -= 1
                self._queued_cost -= waiter.cost
            if not waiters:
                del tenants[waiter.tenant]
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while self._queued and self._inflight < self._slots:
            if self._paced_out():
                self._arm_pace_timer()
                return
            waiter = self._next_eligible()
            if waiter is None:
                return
            self._grant(waiter)

    def _next_eligible(self) -> _Waiter | None:
        owed = sorted((name for name, debt in self._owed.items()
                       if debt > 0.0 and self._depth.get(name)),
                      key=lambda name: -self._owed[name])
        for tier in (*owed, *self._order):
            tenants = self._queues.get(tier)
            if not tenants or self._tier_inflight.get(tier, 0) >= self._tier_caps[tier]:
                continue
            cap = self._rules[tier].tenant_cap
            for tenant in list(tenants):
                waiters = tenants[tenant]
                # A task cancelled this instant has not run its cleanup yet: drop it here.
                while waiters and waiters[0].future.done():
                    stale = waiters[0]
                    self._unqueue(stale)
                    stale.state = _GONE
                if tenant not in tenants:
                    continue
                if self._tenant_inflight.get(tenant, 0) < cap:
                    # Round robin: this tenant goes to the back of its tier's turn order.
                    tenants[tenant] = tenants.pop(tenant)
                    return waiters[0]
        return None

    def _grant(self, waiter: _Waiter) -> None:
        self._unqueue(waiter)
        self._spend(waiter.tier, waiter.cost)
        waiter.state = _GRANTED
        self._inflight += 1
        self._tier_inflight[waiter.tier] = self._tier_inflight.get(waiter.tier, 0) + 1
        self._tenant_inflight[waiter.tenant] = self._tenant_inflight.get(waiter.tenant, 0) + 1
        waited = self._clock.monotonic() - waiter.enqueued_at
        waiter.slot = Slot(self, waiter.tier, waiter.tenant, waiter.cost, waited)
        waiter.future.set_result(None)

    def _release(self, slot: Slot) -> None:
        self._inflight -= 1
        self._tier_inflight[slot.tier] -= 1
        left = self._tenant_inflight[slot.tenant] - 1
        if left:
            self._tenant_inflight[slot.tenant] = left
        else:
            del self._tenant_inflight[slot.tenant]
        if slot.tier not in self._policy.tiers and not self._tier_inflight[slot.tier]:
            self._recompute_rules()
        if self._queued:
            self.expire_due()
            self._dispatch()
        elif self._deadlines:
            # Nobody is queued, so every deadline left belongs to a waiter already served.
            self._deadlines.clear()
