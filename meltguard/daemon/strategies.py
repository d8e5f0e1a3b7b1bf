"""Admission strategies the benchmark compares, all behind the daemon's one `Gate` interface.

`meltguard` is the real Gate, and so is `meltguard-power`: the benchmark runs it with a `power`
section in the policy, so the power lever caps the card before admission has to shed (the
lever acts on the policy, not on the gate). The three baselines are what people run today:

- `none`: everything valid is admitted into one unbounded FIFO queue (a bare server);
- `token-bucket`: one global bucket refilled at a static rate (by default the GPU's nominal
  images/s at full clocks), 429 `rate_limit_exceeded` when it is empty, then the FIFO queue;
- `fixed-concurrency`: TGI's `max_concurrent_requests` semaphore, where a request that finds
  every permit taken is refused at once with 429 (TGI answers "Model is overloaded").

Each implements `admission.strategy.AdmissionStrategy`, so the daemon, its metrics and its
log lines treat them exactly like the real gate (the same key ring, validation, events and
permits); only the decision differs. They ignore pressure and quotas on purpose: that is what
they stand for. They share the real gate's concurrency limit (`policy.concurrency.limit` slots
in front of the engine) so the GPU sees the same parallelism whichever strategy runs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from meltguard.admission.auth import Caller, KeyRing
from meltguard.admission.cost import DEFAULT_SEED_MAX, ImageAsk, cost_of, validate
from meltguard.admission.events import Decided, Decision, Event, EventSink, Outcome, Settled, Waited
from meltguard.admission.gate import Gate
from meltguard.admission.permit import Permit
from meltguard.admission.policy import Level, Policy
from meltguard.admission.strategy import AdmissionStrategy, GateSnapshot
from meltguard.daemon.errors import outcome_of
from meltguard.errors import ErrorCode, Refused, ServiceError, clamp_retry
from meltguard.protocols import Clock, QuotaStore
from meltguard.values import QuotaOutcome

_log = logging.getLogger(__name__)

Strategy = Literal["meltguard", "meltguard-power", "none", "token-bucket", "fixed-concurrency"]
STRATEGIES: tuple[Strategy, ...] = (
    "meltguard", "meltguard-power", "none", "token-bucket", "fixed-concurrency")
BASELINES: tuple[Strategy, ...] = ("none", "token-bucket", "fixed-concurrency")

ENV_BUCKET_RATE = "MELTGUARD_BUCKET_RATE"
ENV_BUCKET_BURST = "MELTGUARD_BUCKET_BURST"
ENV_MAX_CONCURRENT = "MELTGUARD_MAX_CONCURRENT_REQUESTS"


@dataclass(frozen=True, slots=True)
class BaselineOptions:
    """Knobs of the baselines. Rates are per second of the daemon's clock, so a time-compressed
    benchmark passes its rate already multiplied by the compression."""

    bucket_rate: float | None = None  # requests per second; token-bucket refuses to start without
    bucket_burst: float | None = None  # bucket size; None: the concurrency limit
    max_concurrent_requests: int | None = None  # None: the policy's concurrency limit

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BaselineOptions:
        """The serve command has no flags for these (they exist for the benchmark only), so they
        come from MELTGUARD_* variables like every other setting."""
        env = os.environ if environ is None else environ

        def number(name: str) -> float | None:
            raw = env.get(name, "").strip()
            if not raw:
                return None
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{name} must be a number, got {raw!r}") from None
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {raw!r}")
            return value

        concurrent = number(ENV_MAX_CONCURRENT)
        return cls(
            bucket_rate=number(ENV_BUCKET_RATE),
            bucket_burst=number(ENV_BUCKET_BURST),
            max_concurrent_requests=None if concurrent is None else max(1, int(concurrent)),
        )


def make_gate(
    strategy: str,
    policy: Policy,
    store: QuotaStore,
    clock: Clock,
    on_event: EventSink,
    *,
    options: BaselineOptions | None = None,
    rng: random.Random | None = None,
) -> AdmissionStrategy:
    """The admission strategy named `strategy`. Raises ValueError for an unknown one or a
    baseline that lacks a setting it cannot guess (the token bucket's rate)."""
    if strategy in ("meltguard", "meltguard-power"):
        return Gate(policy, store, clock, on_event=on_event, rng=rng, outcome_of=outcome_of)
    opts = options if options is not None else BaselineOptions.from_env()
    if strategy == "none":
        return BaselineGate(policy, store, clock, on_event, strategy="none", rng=rng)
    if strategy == "token-bucket":
        if opts.bucket_rate is None:
            raise ValueError(
                f"strategy token-bucket needs a rate: set {ENV_BUCKET_RATE} (requests per second)"
            )
        burst = opts.bucket_burst or float(policy.concurrency.limit)
        bucket = TokenBucket(opts.bucket_rate, burst, clock.monotonic())
        return BaselineGate(policy, store, clock, on_event, strategy="token-bucket",
                            bucket=bucket, rng=rng)
    if strategy == "fixed-concurrency":
        permits = opts.max_concurrent_requests or policy.concurrency.limit
        return BaselineGate(policy, store, clock, on_event, strategy="fixed-concurrency",
                            max_concurrent=permits, rng=rng)
    raise ValueError(f"unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)})")


class TokenBucket:
    """Continuous refill at `rate` up to `burst` tokens; one request takes one token."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not rate > 0 or not burst >= 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def take(self, now: float) -> float | None:
        """None when a token was taken, else the seconds until one will be there."""
        elapsed = max(now - self.updated, 0.0)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return None
        return (1.0 - self.tokens) / self.rate


class FifoSlots:
    """`limit` slots handed out strictly in arrival order, whatever the tier or tenant."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.busy = 0
        self._waiting: deque[tuple[str, asyncio.Future[None]]] = deque()
        self._tier_busy: dict[str, int] = {}
        self._tier_waiting: dict[str, int] = {}

    def queued(self) -> int:
        return sum(1 for _, future in self._waiting if not future.done())

    def tier_busy(self) -> dict[str, int]:
        return dict(self._tier_busy)

    def tier_waiting(self) -> dict[str, int]:
        return dict(self._tier_waiting)

    def try_acquire(self, tier: str) -> bool:
        if self.busy >= self.limit or self.queued():
            return False
        self._take(tier)
        return True

    async def acquire(self, tier: str) -> None:
        if self.try_acquire(tier):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((tier, future))
        self._tier_waiting[tier] = self._tier_waiting.get(tier, 0) + 1
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Granted in the same instant the client left: hand the slot on.
                self.release(tier)
            else:
                self._forget(tier, future)
            raise

    def release(self, tier: str) -> None:
        self.busy -= 1
        left = self._tier_busy.get(tier, 1) - 1
        if left > 0:
            self._tier_busy[tier] = left
        else:
            self._tier_busy.pop(tier, None)
        self._dispatch()

    def _take(self, tier: str) -> None:
        self.busy += 1
        self._tier_busy[tier] = self._tier_busy.get(tier, 0) + 1

    def _forget(self, tier: str, future: asyncio.Future[None]) -> None:
        try:
            self._waiting.remove((tier, future))
        except ValueError:
            return
        self._uncount_waiting(tier)

    def _uncount_waiting(self, tier: str) -> None:
        left = self._tier_waiting.get(tier, 1) - 1
        if left > 0:
            self._tier_waiting[tier] = left
        else:
            self._tier_waiting.pop(tier, None)

    def _dispatch(self) -> None:
        while self.busy < self.limit and self._waiting:
            tier, future = self._waiting.popleft()
            self._uncount_waiting(tier)
            if future.done():  # cancelled; its task has not run its cleanup yet
                continue
            self._take(tier)
            future.set_result(None)


class BaselineGate:
    """A baseline's decision with the real gate's authentication, validation, events and
    permits. Pressure is recorded (so logs and metrics show the level) but never acted on."""

    def __init__(
        self,
        policy: Policy,
        store: QuotaStore,
        clock: Clock,
        on_event: EventSink,
        *,
        strategy: Strategy,
        bucket: TokenBucket | None = None,
        max_concurrent: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._policy = policy
        self._keyring = KeyRing(policy)
        self._store = store
        self._clock = clock
        self._on_event = on_event
        self._rng = rng if rng is not None else random.Random()
        self._level = Level.NORMAL
        self.strategy = strategy
        self._bucket = bucket
        self._max_concurrent = max_concurrent
        # fixed-concurrency: the semaphore is the whole admission; nothing ever waits in it.
        self._slots = FifoSlots(
            max_concurrent if max_concurrent is not None else policy.concurrency.limit
        )

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def level(self) -> Level:
        return self._level

    @property
    def store_name(self) -> str:
        return self._store.name

    @property
    def overload_status(self) -> int:
        # TGI answers "Model is overloaded" with 429; the others never shed.
        return 429 if self.strategy == "fixed-concurrency" else self._policy.overload_status

    def set_policy(self, policy: Policy) -> None:
        self._policy = policy
        self._keyring = KeyRing(policy)
        if self._max_concurrent is None:
            self._slots.limit = max(1, policy.concurrency.limit)
            self._slots._dispatch()

    def set_pressure(self, level: Level, cooling_eta: float) -> None:
        self._level = level

    def set_duty_budget(self, duty: float | None) -> None:
        return None  # baselines do not pace

    def authenticate(self, authorization_header: str | None, client_id: str) -> Caller:
        return self._keyring.authenticate(authorization_header, client_id)

    def is_admin(self, authorization_header: str | None) -> bool:
        return self._keyring.is_admin(authorization_header)

    def retry_hint(self) -> float:
        return clamp_retry(1.0)

    async def quota_status(self, caller: Caller) -> QuotaOutcome:
        return QuotaOutcome(True, ())  # baselines count no quota

    async def drain(self) -> None:
        return None  # nothing is ever charged, so nothing is refunded

    def snapshot(self) -> GateSnapshot:
        policy = self._policy
        busy, waiting = self._slots.tier_busy(), self._slots.tier_waiting()
        unbounded = self.strategy != "fixed-concurrency"
        return GateSnapshot(
            level=self._level,
            cooling_eta=0.0,
            mode=policy.mode,
            concurrency_limit=self._slots.limit,
            queue_depth=MappingProxyType({t: waiting.get(t, 0) for t in policy.tiers}),
            inflight=MappingProxyType({t: busy.get(t, 0) for t in policy.tiers}),
            quota_factor=MappingProxyType(dict.fromkeys(policy.tiers, 1.0)),
            max_queue_wait=MappingProxyType(
                dict.fromkeys(policy.tiers, math.inf if unbounded else 0.0)
            ),
            service_seconds_per_cost=None,
        )

    async def admit(self, caller: Caller, ask: ImageAsk) -> Permit:
        decided = await self.decide(caller, ask)
        if isinstance(decided, Refused):
            raise decided.error()
        return decided

    async def decide(self, caller: Caller, ask: ImageAsk) -> Permit | Refused:
        policy, level = self._policy, self._level
        tier = caller.tier
        if tier not in policy.tiers:
            return Refused(ErrorCode.INVALID_API_KEY, "Unknown tier for this key.")
        try:
            job = validate(ask, policy, default_seed=self._rng.randint(0, DEFAULT_SEED_MAX))
        except ServiceError as bad:
            self._decided(caller, "reject", str(bad.code), level, 0.0, 0.0)
            return bad.refused
        cost = cost_of(job, policy)
        refusal = self._refusal()
        if refusal is not None:
            self._decided(caller, "reject", str(refusal.code), level, cost, 0.0)
            return refusal

        clock = self._clock
        entered = clock.monotonic()
        try:
            await self._slots.acquire(tier)
        except asyncio.CancelledError:
            self._emit(Waited(tier, clock.monotonic() - entered))
            self._emit(Settled(tier, "ignored", 0.0))
            raise
        waited = clock.monotonic() - entered
        self._decided(caller, "queue" if waited > 0 else "admit", "ok", level, cost, waited)
        return Permit(caller, job, cost=cost, waited=waited, on_settle=self._settle,
                      clock=clock, outcome_of=outcome_of)

    def _refusal(self) -> Refused | None:
        if self.strategy == "token-bucket":
            assert self._bucket is not None
            wait = self._bucket.take(self._clock.monotonic())
            if wait is not None:
                return Refused(
                    ErrorCode.RATE_LIMIT_EXCEEDED,
                    f"Rate limit reached: this server admits {self._bucket.rate:g} requests "
                    "per second.",
                    clamp_retry(wait),
                )
        elif self.strategy == "fixed-concurrency" and self._slots.busy >= self._slots.limit:
            return Refused(
                ErrorCode.SERVER_OVERLOADED,
                f"Model is overloaded: all {self._slots.limit} concurrent request permits are "
                "taken.",
                clamp_retry(1.0),
            )
        return None

    def _decided(
        self, caller: Caller, decision: Decision, reason: str, level: Level, cost: float,
        waited: float,
    ) -> None:
        self._emit(Decided(caller.tier, caller.tenant, decision, reason, level, cost, waited))

    def _settle(self, permit: Permit, outcome: Outcome, seconds: float | None) -> None:
        # Nothing was charged, so nothing is refunded; the FIFO slot is the only resource.
        self._slots.release(permit.tier)
        self._emit(Settled(permit.tier, outcome, 0.0))

    def _emit(self, event: Event) -> None:
        try:
            self._on_event(event)
        except Exception:
            _log.exception("admission event hook failed for %r", event)
