"""The admission gate: every image request passes here before it may touch the GPU.

`Gate.admit(caller, ask)` decides, in this order, and stops at the first refusal:

1. validate the ask against `policy.limits` (400 `invalid_request_error`);
2. degrade it to what the caller's tier may do at the current pressure level;
3. shed the tier if the level says `reject` (`server_overloaded`, `policy.overload_status`,
   Retry-After = queue drain estimate + cooling ETA);
4. charge its cost (reference images) to every quota window of the tier, each limit scaled
   by the level's quota_factor, in one atomic `store.consume` (`rate_limit_exceeded`, or
   `daily_quota_exceeded` with should_retry=False when the window is a day or longer);
5. refuse at once when the estimated queue wait exceeds the tier's max_queue_wait
   (`server_overloaded`), else wait for a slot up to max_queue_wait (`queue_timeout`); both
   refund the quota charged in step 4.

A quota store that raises is the policy's call: `on_store_error: open` admits (and emits
`StoreFailed` plus a `Decided` with reason `fail_open`), `closed` answers
`quota_store_unavailable`. Every Retry-After is computed from the queue, the windows or the
cooling estimate, and lies in [1, 60] s: the OpenAI SDK ignores longer ones.

Shadow mode (`policy.mode: shadow`) runs every step and reports what enforcement would do
(`would_reject` with the first refusal's code, `would_degrade`), but admits the ask unchanged:
quota is charged whenever the store accepts it, and the request waits for a slot with no
deadline and no estimate-based refusal.

The permit must be settled exactly once; the pattern for the daemon is

    permit = await gate.admit(caller, ask)      # raises ServiceError when refused
    async with permit:                          # settles on the way out
        images = await engine.generate(permit.job)

Leaving the block normally settles `success` with the time spent inside it (call
`permit.settle("success", seconds=...)` inside the block to report the engine's own timing);
an exception settles through `outcome_of` (by default: CancelledError -> `ignored`,
ServiceError(gpu_out_of_memory) -> `dropped`, anything else -> `failed`; the daemon passes an
`outcome_of` that also knows `inference.errors.EngineOutOfMemory`). Only `success` keeps the
charge; the others refund it. `settle` is synchronous, so it is safe in a `finally` during
cancellation: the slot is released at once and the refund runs as a task the gate tracks;
`await gate.drain()` waits for those at shutdown.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType

from meltguard.admission.auth import INCORRECT_KEY_MESSAGE, Caller, KeyRing
from meltguard.admission.cost import DEFAULT_SEED_BITS, ImageAsk, cost_of, degrade, validate
from meltguard.admission.events import (
    OUTCOMES,
    REASON_FAIL_OPEN,
    REASON_OK,
    Decided,
    Decision,
    Event,
    EventSink,
    Outcome,
    Settled,
    StoreFailed,
    Waited,
)
from meltguard.admission.policy import EffectiveTier, Level, Policy
from meltguard.admission.scheduler import CallLater, QueueTimeout, Scheduler, Shed, Slot
from meltguard.errors import ErrorCode, ServiceError
from meltguard.protocols import Clock, QuotaStore
from meltguard.values import GenerationJob, QuotaOutcome, QuotaWindow, WindowState

_log = logging.getLogger(__name__)

RETRY_AFTER_MIN = 1.0
RETRY_AFTER_MAX = 60.0  # the openai SDK ignores a longer Retry-After and retries at once
DAY = 86_400.0
_WINDOWS_CACHED = 4096
_NO_QUOTA = QuotaOutcome(True, ())
# How long a quota refusal is answered again without asking the store. Usage only grows
# between refunds, and this gate's own refunds forget the refusal at once; a refund made by
# another daemon sharing the store is seen within this time.
REFUSAL_MEMORY = 1.0


def clamp_retry(seconds: float) -> float:
    if math.isnan(seconds):
        return RETRY_AFTER_MIN
    return min(max(seconds, RETRY_AFTER_MIN), RETRY_AFTER_MAX)


def default_outcome_of(exc: BaseException) -> Outcome:
    if isinstance(exc, asyncio.CancelledError):
        return "ignored"
    if isinstance(exc, ServiceError) and exc.code == ErrorCode.GPU_OUT_OF_MEMORY:
        return "dropped"
    return "failed"


def window_key(tenant: str, period: float) -> str:
    # The {hash tag} keeps all of a tenant's windows on one Redis Cluster slot, so one
    # script can charge them atomically.
    seconds = str(int(period)) if float(period).is_integer() else repr(float(period))
    return f"{{mg:{tenant}}}:{seconds}"


def quota_windows(tenant: str, eff: EffectiveTier) -> tuple[QuotaWindow, ...]:
    return tuple(
        QuotaWindow(window_key(tenant, q.per), q.limit * eff.quota_factor, q.per)
        for q in eff.quotas
    )


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A tenant's last quota refusal: the same cost is refused again, in the same words,
    until `until` (the wall clock), as long as the tier's effective rules are the same object
    (same policy, tier and level)."""

    eff: EffectiveTier
    ask: ImageAsk  # as the client sent it: the same ask again skips validation too
    cost: float
    until: float
    reset_at: float  # when the binding window resets: Retry-After counts down to it
    error: ServiceError
    decided: Decided  # an event is a value: the same refusal reports the same one again

    def again(self, now: float) -> ServiceError:
        first = self.error
        # clamp_retry, inlined: the reset is in the future, so never NaN.
        wait = min(max(self.reset_at - now, RETRY_AFTER_MIN), RETRY_AFTER_MAX)
        if wait == first.retry_after:
            # A refusal is returned as a value (see Gate.decide), so one error can answer
            # them all: a daily window far from its reset always says the 60 s cap.
            return first
        return ServiceError(first.code, first.message, retry_after=wait,
                            should_retry=first.should_retry, quota=first.quota)


@dataclass(frozen=True, slots=True)
class GateSnapshot:
    level: Level
    cooling_eta: float
    mode: str
    concurrency_limit: int
    queue_depth: Mapping[str, int]
    inflight: Mapping[str, int]
    quota_factor: Mapping[str, float]
    max_queue_wait: Mapping[str, float]
    service_seconds_per_cost: float | None


class Permit:
    """Leave to run one job. Settle it once: `success`, `dropped` (GPU out of memory),
    `ignored` (client left) or `failed`; a second settle does nothing."""

    __slots__ = (
        "_entered_at", "_gate", "_outcome", "_slot", "_windows", "caller", "charged",
        "charged_at", "cost", "degraded", "job", "quota", "waited",
    )

    def __init__(
        self,
        gate: Gate,
        caller: Caller,
        job: GenerationJob,
        degraded: tuple[str, ...],
        cost: float,
        waited: float,
        quota: QuotaOutcome | None,
        slot: Slot,
        windows: tuple[QuotaWindow, ...],
        charged: float,
        charged_at: float,
    ) -> None:
        self._gate = gate
        self.caller = caller
        self.job = job
        self.degraded = degraded
        self.cost = cost
        self.waited = waited
        self.quota = quota  # None only when the store failed and the policy admitted anyway
        self._slot = slot
        self._windows = windows
        self.charged = charged  # reference images charged to the quota; what a refund returns
        self.charged_at = charged_at
        self._outcome: Outcome | None = None
        self._entered_at: float | None = None

    @property
    def tier(self) -> str:
        return self.caller.tier

    @property
    def tenant(self) -> str:
        return self.caller.tenant

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    def settle(self, outcome: Outcome, seconds: float | None = None) -> None:
        """Release the slot now; `seconds` (generation time) feeds the service-time estimate
        on success. Refunds for the other outcomes run as tracked tasks (see Gate.drain)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")
        if self._outcome is not None:
            return
        self._outcome = outcome
        self._gate._settle(self, outcome, seconds)

    async def __aenter__(self) -> Permit:
        self._entered_at = self._gate._clock.monotonic()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._outcome is not None:
            return
        if exc is None:
            started = self._entered_at
            seconds = None if started is None else self._gate._clock.monotonic() - started
            self.settle("success", seconds)
        else:
            self.settle(self._gate._outcome_of(exc))


class Gate:
    def __init__(
        self,
        policy: Policy,
        store: QuotaStore,
        clock: Clock,
        on_event: EventSink,
        rng: random.Random | None = None,
        *,
        call_later: CallLater | None = None,
        outcome_of: Callable[[BaseException], Outcome] = default_outcome_of,
    ) -> None:
        self._policy = policy
        self._keyring = KeyRing(policy)
        self._store = store
        self._clock = clock
        self._on_event = on_event
        self._rng = rng if rng is not None else random.Random()
        self._outcome_of = outcome_of
        self._level = Level.NORMAL
        self._cooling_eta = 0.0
        self._scheduler = Scheduler(policy, clock, call_later=call_later)
        self._tasks: set[asyncio.Task[None]] = set()
        # What a decision reads that depends only on (policy, tier, level[, tenant]): built
        # once, dropped with the policy.
        self._effective_cache: dict[tuple[str, Level], EffectiveTier] = {}
        self._windows_cache: dict[tuple[str, str, Level], tuple[QuotaWindow, ...]] = {}
        self._quota_heads: dict[tuple[str, float, Level, float, float], str] = {}
        self._refusals: dict[str, _Refusal] = {}
        self._settled: dict[tuple[str, Outcome], Settled] = {}
        self._admitted: dict[str, Decided] = {}
        self._reference_note = _reference_note(policy)

    # -- configuration and readings ------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def level(self) -> Level:
        return self._level

    @property
    def scheduler(self) -> Scheduler:
        return self._scheduler

    def set_policy(self, policy: Policy) -> None:
        """Live reload. Quota counts live in the store, and queued waiters and in-flight
        permits stay where they are; new limits apply to decisions made from now on, except
        that waiters of a tier the new policy sheds at the current level are shed."""
        self._policy = policy
        self._keyring = KeyRing(policy)
        self._effective_cache = {}
        self._windows_cache = {}
        self._quota_heads = {}
        self._refusals = {}
        self._reference_note = _reference_note(policy)
        self._scheduler.set_policy(policy)
        self._shed_queued()

    def set_pressure(self, level: Level, cooling_eta: float) -> None:
        """The pressure level and the estimated time to cool below it. A tier the new level
        sheds is shed in the queue too: a request admitted before the GPU got hot would
        otherwise still run on it (and its quota is refunded)."""
        changed = level != self._level
        self._level = level
        self._cooling_eta = max(cooling_eta, 0.0) if math.isfinite(cooling_eta) else (
            RETRY_AFTER_MAX
        )
        self._scheduler.set_level(level)
        if changed:
            self._shed_queued()

    def _shed_queued(self) -> None:
        policy = self._policy
        if policy.mode == "shadow":
            return
        for tier in policy.tiers:
            if policy.effective(tier, self._level).reject:
                self._scheduler.shed(tier)

    @property
    def store_name(self) -> str:
        return self._store.name

    def authenticate(self, authorization_header: str | None, client_id: str) -> Caller:
        return self._keyring.authenticate(authorization_header, client_id)

    def is_admin(self, authorization_header: str | None) -> bool:
        """Whether the header carries the policy's admin key (never true without one)."""
        return self._keyring.is_admin(authorization_header)

    def retry_hint(self) -> float:
        """Retry-After for an overload the gate did not decide itself (a GPU out-of-memory
        answer): the time for today's queue to start, plus the cooling estimate."""
        return clamp_retry(self._scheduler.drain_estimate() + self._cooling_eta)

    def expire_waiters(self) -> int:
        """Time out waiters whose deadline passed on the clock (loop timers do this too)."""
        return self._scheduler.expire_due()

    def snapshot(self) -> GateSnapshot:
        policy, level = self._policy, self._level
        effective = {name: policy.effective(name, level) for name in policy.tiers}
        return GateSnapshot(
            level=level,
            cooling_eta=self._cooling_eta,
            mode=policy.mode,
            concurrency_limit=self._scheduler.limit,
            queue_depth=MappingProxyType(self._scheduler.queue_depth()),
            inflight=MappingProxyType(self._scheduler.inflight()),
            quota_factor=MappingProxyType({n: e.quota_factor for n, e in effective.items()}),
            max_queue_wait=MappingProxyType({n: e.max_queue_wait for n, e in effective.items()}),
            service_seconds_per_cost=self._scheduler.service_seconds_per_cost,
        )

    async def quota_status(self, caller: Caller) -> QuotaOutcome:
        """The caller's windows as they stand (limits scaled by the current quota_factor),
        without charging. Raises QUOTA_STORE_UNAVAILABLE when the store fails."""
        windows = quota_windows(caller.tenant, self._effective(caller))
        if not windows:
            return QuotaOutcome(True, ())
        try:
            return await self._store.peek(windows, self._clock.wall())
        except Exception as exc:
            self._store_failed(exc)
            raise self._store_unavailable() from exc

    async def drain(self) -> None:
        """Wait for every outstanding refund (call at shutdown, after the last settle)."""
        while self._tasks:
            await asyncio.gather(*tuple(self._tasks), return_exceptions=True)

    # -- the decision ----------------------------------------------------------------------------

    async def admit(self, caller: Caller, ask: ImageAsk) -> Permit:
        """A permit, or the refusal raised as a ServiceError."""
        decision = await self.decide(caller, ask)
        if isinstance(decision, ServiceError):
            # One refusal may answer many requests: raise it without the last raise's frames.
            raise decision.with_traceback(None)
        return decision

    async def decide(self, caller: Caller, ask: ImageAsk) -> Permit | ServiceError:
        """A permit, or the refusal returned rather than raised: a refusal is an answer, not a
        fault, and the daemon answers floods of them. Raised, each would carry a traceback
        through every frame it crossed, and that traceback the frames whose locals hold the
        refusal: a reference cycle per refused request, left to the garbage collector."""
        policy, level = self._policy, self._level
        shadow = policy.mode == "shadow"
        tier, tenant = caller.tier, caller.tenant
        eff = self._effective_cache.get((tier, level))
        if eff is None:
            try:
                eff = self._effective(caller)
            except ServiceError as gone:  # the caller's tier vanished in a reload
                return gone.with_traceback(None)
        refused = self._refusals.get(tenant)
        if refused is not None and refused.ask == ask and not shadow:
            # A client retrying the same request in a loop after its quota ran out.
            now = self._clock.wall()
            if refused.eff is eff and now < refused.until:
                self._emit(refused.decided)
                return refused.again(now)

        try:
            asked = validate(
                ask, policy,
                default_seed=self._rng.getrandbits(DEFAULT_SEED_BITS) if ask.seed is None else None,
            )
        except ServiceError as bad:
            return self._refused(caller, level, bad.with_traceback(None))
        degraded_job, changes = degrade(asked, eff)
        job = asked if shadow else degraded_job
        # Shadow mode: the first refusal enforcement would have answered.
        would: ServiceError | None = None

        if eff.reject:
            err = ServiceError(
                ErrorCode.SERVER_OVERLOADED,
                f"The server is overloaded (GPU pressure: {level.label}) and is not taking "
                f"{tier}-tier requests right now.",
                retry_after=clamp_retry(self._scheduler.drain_estimate() + self._cooling_eta),
                status=policy.overload_status,
            )
            if not shadow:
                return self._refused(caller, level, err, degraded=changes)
            would = would or err

        cost = cost_of(job, policy)
        windows = self._windows_cache.get((tenant, eff.name, level))
        if windows is None:
            windows = self._windows(tenant, eff, level)
        quota: QuotaOutcome | None = _NO_QUOTA
        charged, charged_at, fail_open = 0.0, 0.0, False
        if windows:
            now = self._clock.wall()
            if (refused is not None and refused.eff is eff and refused.cost == cost
                    and now < refused.until and not shadow):
                # The same cost as a refusal a moment ago: answered without the store.
                return self._refused(caller, level, refused.again(now), cost, changes)
            charge_id = uuid.uuid4().hex
            try:
                quota = await self._store.consume(windows, cost, now, charge_id=charge_id)
            except Exception as exc:  # any store failure: network, timeout, corruption, bug
                self._store_failed(exc)
                quota = None
                if policy.on_store_error == "closed":
                    err = self._store_unavailable()
                    if not shadow:
                        return self._refused(caller, level, err, cost, changes)
                    would = would or err
                else:
                    fail_open = True
            else:
                if quota.allowed:
                    charged, charged_at = cost, quota.charged_at
                else:
                    err, reset_at = self._quota_error(quota, now, eff, cost)
                    if not shadow:
                        decided = Decided(tier, tenant, "reject", err.code.value, level, cost,
                                          0.0, changes)
                        self._remember_refusal(tenant, _Refusal(
                            eff, ask, cost, min(now + REFUSAL_MEMORY, reset_at),
                            reset_at, err, decided))
                        self._emit(decided)
                        return err
                    would = would or err

        scheduler = self._scheduler
        # Nobody queued and a slot free: granted on the spot, without a waiter or a timer.
        # That is exactly when the wait estimate is zero, so it is only made otherwise.
        slot = scheduler.try_acquire(tier, tenant, cost)
        estimate = None if slot is not None else scheduler.estimate_wait(tier, cost)
        if estimate is not None and estimate > eff.max_queue_wait:
            err = ServiceError(
                ErrorCode.SERVER_OVERLOADED,
                f"The server is overloaded: the estimated queue wait ({estimate:.0f} s) is "
                f"longer than the {eff.max_queue_wait:g} s a {tier}-tier request may wait.",
                retry_after=clamp_retry(estimate - eff.max_queue_wait),
                status=policy.overload_status,
            )
            if not shadow:
                await self._refund_now(tenant, windows, charged, charged_at)
                return self._refused(caller, level, err, cost, changes)
            would = would or err

        if slot is None:
            queued = await self._wait_for_slot(
                caller, level, eff, cost, changes, shadow, windows, charged, charged_at
            )
            if isinstance(queued, ServiceError):
                return queued
            slot = queued
        waited = slot.waited  # reported in the Decided below, as every admission's wait is
        if shadow and would is None and waited > eff.max_queue_wait:
            would = ServiceError(ErrorCode.QUEUE_TIMEOUT, "would have timed out in the queue")

        reason = REASON_FAIL_OPEN if fail_open else REASON_OK
        decision: Decision
        if would is not None:
            decision, reason = "would_reject", str(would.code)
        elif shadow and changes:
            decision = "would_degrade"
        elif changes:
            decision = "degrade"
        elif waited > 0:
            decision = "queue"
        else:
            self._emit(self._admitted_at_once(tier, tenant, reason, level, cost))
            return Permit(self, caller, job, (), cost, waited, quota, slot, windows, charged,
                          charged_at)
        self._emit(Decided(tier, tenant, decision, reason, level, cost, waited, changes))
        return Permit(
            self, caller, job, () if shadow else changes, cost, waited, quota, slot,
            windows, charged, charged_at,
        )

    async def _wait_for_slot(
        self,
        caller: Caller,
        level: Level,
        eff: EffectiveTier,
        cost: float,
        changes: tuple[str, ...],
        shadow: bool,
        windows: tuple[QuotaWindow, ...],
        charged: float,
        charged_at: float,
    ) -> Slot | ServiceError:
        tier = caller.tier
        entered = self._clock.monotonic()
        try:
            return await self._scheduler.acquire(
                tier, caller.tenant, cost, None if shadow else eff.max_queue_wait
            )
        except Shed as exc:
            self._emit(Waited(tier, exc.waited))
            await self._refund_now(caller.tenant, windows, charged, charged_at)
            now_level = self._level
            return self._refused(caller, now_level, ServiceError(
                ErrorCode.SERVER_OVERLOADED,
                f"The server is overloaded (GPU pressure: {now_level.label}) and stopped "
                f"taking {tier}-tier requests while this one waited in the queue; nothing "
                "was charged.",
                retry_after=clamp_retry(self._scheduler.drain_estimate() + self._cooling_eta),
                status=self._policy.overload_status,
            ), cost, changes)
        except QueueTimeout as exc:
            self._emit(Waited(tier, exc.waited))
            await self._refund_now(caller.tenant, windows, charged, charged_at)
            later = self._scheduler.estimate_wait(tier, cost)
            return self._refused(caller, level, ServiceError(
                ErrorCode.QUEUE_TIMEOUT,
                f"No GPU slot came free within the {eff.max_queue_wait:g} s a {tier}-tier "
                "request may wait in the queue.",
                retry_after=clamp_retry(later if later is not None else exc.waited),
            ), cost, changes)
        except asyncio.CancelledError:
            # The client left while queued: nothing ran, so give the charge back.
            self._emit(Waited(tier, self._clock.monotonic() - entered))
            self._spawn_refund(caller.tenant, windows, charged, charged_at)
            self._emit(Settled(tier, "ignored", charged))
            raise

    def _refused(
        self,
        caller: Caller,
        level: Level,
        err: ServiceError,
        cost: float = 0.0,
        degraded: tuple[str, ...] = (),
    ) -> ServiceError:
        self._emit(Decided(caller.tier, caller.tenant, "reject", err.code.value, level, cost, 0.0,
                           degraded))
        return err

    # -- helpers ---------------------------------------------------------------------------------

    def _effective(self, caller: Caller) -> EffectiveTier:
        if caller.tier not in self._policy.tiers:
            # The key's tier vanished in a reload between authentication and admission.
            raise ServiceError(ErrorCode.INVALID_API_KEY, INCORRECT_KEY_MESSAGE)
        key = (caller.tier, self._level)
        eff = self._effective_cache.get(key)
        if eff is None:
            eff = self._effective_cache[key] = self._policy.effective(caller.tier, self._level)
        return eff

    def _windows(self, tenant: str, eff: EffectiveTier, level: Level) -> tuple[QuotaWindow, ...]:
        key = (tenant, eff.name, level)
        windows = self._windows_cache.get(key)
        if windows is None:
            if len(self._windows_cache) >= _WINDOWS_CACHED:
                # Anonymous tenants are one per client address: keep the cache bounded.
                self._windows_cache.clear()
            windows = self._windows_cache[key] = quota_windows(tenant, eff)
        return windows

    def _admitted_at_once(
        self, tier: str, tenant: str, reason: str, level: Level, cost: float
    ) -> Decided:
        """The Decided of an admission with no wait and no change. An event is a value: a
        tenant admitted again and again reports the same one, built once."""
        last = self._admitted.get(tenant)
        if (last is not None and last.cost == cost and last.level is level
                and last.tier == tier and last.reason == reason):
            return last
        if len(self._admitted) >= _WINDOWS_CACHED:
            self._admitted.clear()
        decided = self._admitted[tenant] = Decided(tier, tenant, "admit", reason, level, cost,
                                                   0.0)
        return decided

    def _remember_refusal(self, tenant: str, refusal: _Refusal) -> None:
        if len(self._refusals) >= _WINDOWS_CACHED:
            self._refusals.clear()
        self._refusals[tenant] = refusal

    def _quota_error(
        self, quota: QuotaOutcome, now: float, eff: EffectiveTier, cost: float
    ) -> tuple[ServiceError, float]:
        """The refusal, and when the window it names resets."""
        state = _binding(quota, cost)
        window = state.window
        wait = state.reset_at - now
        what = (
            f"{self._quota_head(eff, window)}{_amount(state.used)} used, this request costs "
            f"{_amount(cost)}{self._reference_note}"
        )
        if cost > window.limit:
            what += (
                "; this request alone is more than the window allows, so ask for fewer or "
                "smaller images or fewer steps"
            )
        if window.period >= DAY:
            return ServiceError(
                ErrorCode.DAILY_QUOTA_EXCEEDED,
                f"Quota exceeded: {what}. It resets at {_utc_minute(state.reset_at)}.",
                retry_after=clamp_retry(wait),
                should_retry=False,
                quota=quota,
            ), state.reset_at
        return ServiceError(
            ErrorCode.RATE_LIMIT_EXCEEDED,
            f"Rate limit reached: {what}. Try again in {math.ceil(max(wait, 1.0))} s.",
            retry_after=clamp_retry(wait),
            quota=quota,
        ), state.reset_at

    def _quota_head(self, eff: EffectiveTier, window: QuotaWindow) -> str:
        """The fixed part of a quota refusal's message for one window of a tier at the
        current level; a flood of refusals formats it once."""
        key = (eff.name, eff.quota_factor, self._level, window.limit, window.period)
        head = self._quota_heads.get(key)
        if head is None:
            scaled = "" if eff.quota_factor == 1.0 else (
                f" (reduced to {eff.quota_factor:g}x while the GPU is under "
                f"{self._level.label} pressure)"
            )
            head = self._quota_heads[key] = (
                f"{_amount(window.limit)} reference images per {_period(window.period)} for "
                f"tier {eff.name}{scaled}; "
            )
        return head

    def _store_unavailable(self) -> ServiceError:
        # Jittered so that clients refused together do not come back together.
        return ServiceError(
            ErrorCode.QUOTA_STORE_UNAVAILABLE,
            "The quota store is unavailable, so this request cannot be counted; try again "
            "shortly.",
            retry_after=clamp_retry(1.0 + self._rng.random()),
        )

    def _store_failed(self, exc: BaseException) -> None:
        self._emit(StoreFailed(self._store.name, f"{type(exc).__name__}: {exc}"))

    async def _refund_now(
        self, tenant: str, windows: tuple[QuotaWindow, ...], charged: float, charged_at: float
    ) -> None:
        """Refund before answering, so a client retrying at once finds its quota restored.
        Shielded: if the request is cancelled meanwhile, the refund still completes."""
        task = self._spawn_refund(tenant, windows, charged, charged_at)
        if task is not None:
            await asyncio.shield(task)

    def _spawn_refund(
        self, tenant: str, windows: tuple[QuotaWindow, ...], charged: float, charged_at: float
    ) -> asyncio.Task[None] | None:
        if charged <= 0 or not windows:
            return None
        self._refusals.pop(tenant, None)
        task = asyncio.get_running_loop().create_task(self._refund(windows, charged, charged_at))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _refund(
        self, windows: tuple[QuotaWindow, ...], charged: float, charged_at: float
    ) -> None:
        try:
            await self._store.refund(windows, charged, charged_at)
        except Exception as exc:
            self._store_failed(exc)

    def _settle(self, permit: Permit, outcome: Outcome, seconds: float | None) -> None:
        if outcome == "success":
            self._scheduler.record_success(seconds, permit.cost)
        elif outcome == "dropped":
            self._scheduler.record_drop()
        permit._slot.release()
        refunded = 0.0 if outcome == "success" else permit.charged
        tier = permit.caller.tier
        if refunded:
            self._spawn_refund(permit.caller.tenant, permit._windows, refunded,
                               permit.charged_at)
            self._emit(Settled(tier, outcome, refunded))
            return
        # An event is a value: every refund-free settle of a tier reports the same one.
        settled = self._settled.get((tier, outcome))
        if settled is None:
            settled = self._settled[(tier, outcome)] = Settled(tier, outcome, 0.0)
        self._emit(settled)

    def _emit(self, event: Event) -> None:
        # A broken metrics or log hook must never cost a slot or a refund.
        try:
            self._on_event(event)
        except Exception:
            _log.exception("admission event hook failed for %r", event)


def _binding(quota: QuotaOutcome, cost: float) -> WindowState:
    """The window a quota refusal names: of those the cost does not fit, the one that resets
    last, since naming an earlier one would only send the client back to be refused again."""
    state: WindowState | None = None
    for candidate in quota.windows:
        if candidate.used + cost > candidate.window.limit + 1e-9 and (
            state is None or candidate.reset_at > state.reset_at
        ):
            state = candidate
    if state is not None:
        return state
    if quota.exhausted is not None:
        return quota.exhausted
    return min(quota.windows, key=lambda s: s.remaining)


@functools.lru_cache(maxsize=1024)
def _amount(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


@functools.lru_cache(maxsize=64)
def _utc_minute(unix: float) -> str:
    # Windows reset on fixed boundaries, so a day's refusals all name the same few instants.
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(unix))


def _reference_note(policy: Policy) -> str:
    reference = policy.cost.reference
    return f" (a {reference.size} image at {reference.steps} steps counts as 1)"


def _period(seconds: float) -> str:
    for name, size in (("day", DAY), ("hour", 3600.0), ("minute", 60.0)):
        count = seconds / size
        if count >= 1 and count.is_integer():
            return name if count == 1 else f"{int(count)} {name}s"
    return f"{seconds:g} s"
