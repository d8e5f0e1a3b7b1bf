"""The admission gate: every image request passes here before it may touch the GPU.

`Gate.decide(caller, ask)` runs four steps and stops at the first refusal:

1. shape: validate the ask against `policy.limits` (`invalid_request_error`) and degrade it to
   what the caller's tier may do at the current pressure level;
2. shed: refuse the tier if the level says `reject` (`server_overloaded`);
3. charge: charge its cost (reference images) to every quota window of the tier, in one
   atomic `store.consume` under a charge id of its own (`rate_limit_exceeded`, or
   `daily_quota_exceeded` when the window is a day or longer); a store that fails is the
   policy's call (`on_store_error`: `open` admits, `closed` answers `quota_store_unavailable`);
4. queue: refuse at once when the estimated wait exceeds the tier's max_queue_wait
   (`server_overloaded`), else wait for a slot up to it (`queue_timeout`).

Shadow mode (`policy.mode: shadow`) runs every step, charging whatever the store accepts and
waiting with no deadline or estimate, then admits the ask unchanged and reports what
enforcement would have done (`would_reject` with the first refusal, `would_degrade`).

Every charge is refunded, under its own id, unless its permit settles `success`: a refusal
after the charge, a client that leaves in the queue or while the store call is in flight, a
failed or dropped generation. The store's ids make each refund count once, and a refund that
reaches the store before its charge voids it. (A consume that failed with an error is the
store chain's to void: stores/refunds.py.)
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

from meltguard.admission import refusals
from meltguard.admission.auth import INCORRECT_KEY_MESSAGE, Caller, KeyRing
from meltguard.admission.cost import DEFAULT_SEED_BITS, ImageAsk, cost_of, degrade, validate
from meltguard.admission.events import (
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
from meltguard.admission.permit import Permit, default_outcome_of
from meltguard.admission.policy import EffectiveTier, Level, Policy
from meltguard.admission.scheduler import CallLater, QueueTimeout, Scheduler, Shed, Slot
from meltguard.admission.strategy import GateSnapshot
from meltguard.errors import RETRY_AFTER_MAX, ErrorCode, Refused, ServiceError, clamp_retry
from meltguard.protocols import Clock, QuotaStore
from meltguard.values import GenerationJob, QuotaOutcome, QuotaWindow

__all__ = ["Charge", "Gate", "Permit", "quota_windows", "window_key"]

_log = logging.getLogger(__name__)


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
class Charge:
    """One request's quota charge, as a refund needs it."""

    windows: tuple[QuotaWindow, ...]
    cost: float
    at: float  # the store's clock at the charge: a refund goes to the windows current then
    charge_id: str


@dataclass(slots=True)
class _Ask:
    """One decision in progress: what the steps found so far."""

    caller: Caller
    eff: EffectiveTier
    level: Level
    job: GenerationJob
    changes: tuple[str, ...]
    cost: float
    would: Refused | None = None  # the first refusal; in shadow mode, what it would have been
    charge: Charge | None = None  # None when nothing was (or may have been) charged
    quota: QuotaOutcome | None = None
    fail_open: bool = False


class Gate:
    """Owns the admission decision: the policy and its key ring, the pressure level, the
    quota charges in the store (and their refunds), and the scheduler that hands out GPU
    slots. It emits one `Decided` per decision and never touches HTTP or metrics."""

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

    @property
    def store_name(self) -> str:
        return self._store.name

    @property
    def overload_status(self) -> int:
        return self._policy.overload_status

    def set_policy(self, policy: Policy) -> None:
        """Live reload. Quota counts live in the store, and queued waiters and in-flight
        permits stay where they are; new limits apply to decisions made from now on, except
        that waiters of a tier the new policy sheds at the current level are shed."""
        self._policy = policy
        self._keyring = KeyRing(policy)
        self._scheduler.set_policy(policy)
        self._shed_queued()

    def set_pressure(self, level: Level, cooling_eta: float) -> None:
        """The pressure level and the estimated time to cool below it. A tier the new level
        sheds is shed in the queue too: a request admitted before the GPU got hot would
        otherwise still run on it (and its quota is refunded)."""
        changed = level != self._level
        self._level = level
        self._cooling_eta = (max(cooling_eta, 0.0) if math.isfinite(cooling_eta)
                             else RETRY_AFTER_MAX)
        self._scheduler.set_level(level)
        if changed:
            self._shed_queued()

    def set_duty_budget(self, duty: float | None) -> None:
        """Pacing toward the policy's hold line (see the scheduler's "Pace")."""
        self._scheduler.set_duty_budget(duty)

    def _shed_queued(self) -> None:
        policy = self._policy
        if policy.mode == "shadow":
            return
        for tier in policy.tiers:
            if policy.effective(tier, self._level).reject:
                self._scheduler.shed(tier)

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
        eff = self._effective(caller)
        if isinstance(eff, Refused):
            raise eff.error()
        windows = quota_windows(caller.tenant, eff)
        if not windows:
            return QuotaOutcome(True, ())
        try:
            return await self._store.peek(windows, self._clock.wall())
        except Exception as exc:
            self._store_failed(exc)
            raise refusals.store_unavailable(self._rng.random()).error() from exc

    async def drain(self) -> None:
        """Wait for every outstanding refund (call at shutdown, after the last settle)."""
        while self._tasks:
            await asyncio.gather(*tuple(self._tasks), return_exceptions=True)

    # -- the decision ----------------------------------------------------------------------------

    async def admit(self, caller: Caller, ask: ImageAsk) -> Permit:
        """A permit, or the refusal raised as a ServiceError."""
        decided = await self.decide(caller, ask)
        if isinstance(decided, Refused):
            raise decided.error()
        return decided

    async def decide(self, caller: Caller, ask: ImageAsk) -> Permit | Refused:
        """A permit to run the (possibly degraded) job, or the refusal."""
        level = self._level
        shaped = self._shape(caller, ask, level)
        if isinstance(shaped, Refused):
            return self._reject(caller, level, shaped)
        shadow = self._policy.mode == "shadow"
        shaped.would = self._shed(shaped)
        if shaped.would is None or shadow:
            await self._charge(shaped)
        slot: Slot | None = None
        if shaped.would is None or shadow:
            slot = await self._queue(shaped, shadow)
        if slot is None or (shaped.would is not None and not shadow):
            assert shaped.would is not None  # the queue step hands out no slot only with one
            return self._reject(caller, shaped.level, shaped.would, shaped)
        return self._grant(shaped, slot, shadow)

    def _shape(self, caller: Caller, ask: ImageAsk, level: Level) -> _Ask | Refused:
        """Validate the ask and degrade it for the tier at this level."""
        eff = self._effective(caller)
        if isinstance(eff, Refused):
            return eff
        policy = self._policy
        seed = self._rng.getrandbits(DEFAULT_SEED_BITS) if ask.seed is None else None
        try:
            asked = validate(ask, policy, default_seed=seed)
        except ServiceError as bad:
            return bad.refused
        degraded, changes = degrade(asked, eff)
        job = asked if policy.mode == "shadow" else degraded
        return _Ask(caller, eff, level, job, changes, cost_of(job, policy))

    def _shed(self, shaped: _Ask) -> Refused | None:
        if not shaped.eff.reject:
            return None
        return refusals.shed(shaped.caller.tier, shaped.level, self._retry_after_cooling())

    async def _charge(self, shaped: _Ask) -> None:
        """Charge the cost to the tier's windows. Cancellation-safe: a client that leaves
        while the store call is in flight has its charge voided by id (the call may have
        landed or not), in a refund task `drain()` awaits."""
        windows = quota_windows(shaped.caller.tenant, shaped.eff)
        if not windows:
            shaped.quota = QuotaOutcome(True, ())
            return
        now = self._clock.wall()
        charge = Charge(windows, shaped.cost, now, uuid.uuid4().hex)
        try:
            quota = await self._store.consume(windows, shaped.cost, now,
                                              charge_id=charge.charge_id)
        except asyncio.CancelledError:
            self._spawn_refund(charge)
            raise
        except Exception as exc:  # any store failure: network, timeout, corruption, bug
            # Nothing is known charged. A consume that may have landed all the same is the
            # store chain's to void by its id (stores/refunds.py), which knows whether the
            # call could have been applied at all.
            self._store_failed(exc)
            if self._policy.on_store_error == "closed":
                shaped.would = shaped.would or refusals.store_unavailable(self._rng.random())
            else:
                shaped.fail_open = True
            return
        if quota.allowed:
            shaped.charge = Charge(windows, shaped.cost, quota.charged_at, charge.charge_id)
            shaped.quota = quota
        else:
            shaped.would = shaped.would or refusals.over_quota(
                quota, now, shaped.eff, shaped.level, shaped.cost, self._policy)

    async def _queue(self, shaped: _Ask, shadow: bool) -> Slot | None:
        """A GPU slot: at once when one is free, else after a wait within the tier's budget.
        None when refused (`shaped.would` says why); the charge is then refunded before the
        answer, so a client retrying at once finds its quota restored."""
        tier, tenant = shaped.caller.tier, shaped.caller.tenant
        eff, cost, scheduler = shaped.eff, shaped.cost, self._scheduler
        slot = scheduler.try_acquire(tier, tenant, cost)
        if slot is not None:
            return slot
        estimate = scheduler.estimate_wait(tier, cost)
        if estimate is not None and estimate > eff.max_queue_wait:
            too_long = refusals.queue_too_long(tier, estimate, eff.max_queue_wait)
            if shadow:
                shaped.would = shaped.would or too_long
            else:
                shaped.would = too_long
                await self._refund_now(shaped)
                return None
        entered = self._clock.monotonic()
        try:
            return await scheduler.acquire(tier, tenant, cost,
                                           None if shadow else eff.max_queue_wait)
        except Shed as exc:
            self._emit(Waited(tier, exc.waited))
            shaped.level = self._level
            shaped.would = refusals.shed_while_queued(tier, shaped.level,
                                                      self._retry_after_cooling())
        except QueueTimeout as exc:
            self._emit(Waited(tier, exc.waited))
            later = scheduler.estimate_wait(tier, cost)
            shaped.would = refusals.queue_timeout(
                tier, eff.max_queue_wait, later if later is not None else exc.waited)
        except asyncio.CancelledError:
            # The client left while queued: nothing ran, so give the charge back.
            self._emit(Waited(tier, self._clock.monotonic() - entered))
            self._spawn_refund(shaped.charge)
            self._emit(Settled(tier, "ignored", self._charged(shaped.charge)))
            raise
        await self._refund_now(shaped)
        return None

    def _grant(self, shaped: _Ask, slot: Slot, shadow: bool) -> Permit:
        """The permit; shadow mode's verdict is applied here, once."""
        waited = slot.waited
        would = shaped.would
        if shadow and would is None and waited > shaped.eff.max_queue_wait:
            would = Refused(ErrorCode.QUEUE_TIMEOUT, "would have timed out in the queue")
        decision: Decision
        reason = REASON_FAIL_OPEN if shaped.fail_open else REASON_OK
        if would is not None:
            decision, reason = "would_reject", would.code.value
        elif shaped.changes:
            decision = "would_degrade" if shadow else "degrade"
        else:
            decision = "queue" if waited > 0 else "admit"
        caller = shaped.caller
        self._emit(Decided(caller.tier, caller.tenant, decision, reason, shaped.level,
                           shaped.cost, waited, shaped.changes))
        charge = shaped.charge

        def settle(permit: Permit, outcome: Outcome, seconds: float | None) -> None:
            self._settle(slot, charge, permit, outcome, seconds)

        return Permit(
            caller, shaped.job, cost=shaped.cost, degraded=() if shadow else shaped.changes,
            waited=waited, quota=shaped.quota, charged=self._charged(charge),
            charged_at=charge.at if charge is not None else 0.0, on_settle=settle,
            clock=self._clock, outcome_of=self._outcome_of,
        )

    def _reject(self, caller: Caller, level: Level, refused: Refused,
                shaped: _Ask | None = None) -> Refused:
        cost, changes = (shaped.cost, shaped.changes) if shaped is not None else (0.0, ())
        self._emit(Decided(caller.tier, caller.tenant, "reject", refused.code.value, level,
                           cost, 0.0, changes))
        return refused

    # -- settling and refunds --------------------------------------------------------------------

    def _settle(self, slot: Slot, charge: Charge | None, permit: Permit, outcome: Outcome,
                seconds: float | None) -> None:
        if outcome == "success":
            self._scheduler.record_success(seconds, permit.cost)
        elif outcome == "dropped":
            self._scheduler.record_drop()
        slot.release()
        refunded = 0.0
        if outcome != "success":
            self._spawn_refund(charge)
            refunded = self._charged(charge)
        self._emit(Settled(permit.tier, outcome, refunded))

    @staticmethod
    def _charged(charge: Charge | None) -> float:
        return charge.cost if charge is not None else 0.0

    async def _refund_now(self, shaped: _Ask) -> None:
        """Refund before answering. Shielded: if the request is cancelled meanwhile, the
        refund still completes."""
        task = self._spawn_refund(shaped.charge)
        shaped.charge = None
        if task is not None:
            await asyncio.shield(task)

    def _spawn_refund(self, charge: Charge | None) -> asyncio.Task[None] | None:
        if charge is None:
            return None
        task = asyncio.get_running_loop().create_task(self._refund(charge))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _refund(self, charge: Charge) -> None:
        try:
            await self._store.refund(charge.windows, charge.cost, charge.at,
                                     charge_id=charge.charge_id)
        except Exception as exc:
            self._store_failed(exc)

    # -- helpers ---------------------------------------------------------------------------------

    def _effective(self, caller: Caller) -> EffectiveTier | Refused:
        if caller.tier not in self._policy.tiers:
            # The key's tier vanished in a reload between authentication and admission.
            return Refused(ErrorCode.INVALID_API_KEY, INCORRECT_KEY_MESSAGE)
        return self._policy.effective(caller.tier, self._level)

    def _retry_after_cooling(self) -> float:
        return self._scheduler.drain_estimate() + self._cooling_eta

    def _store_failed(self, exc: BaseException) -> None:
        self._emit(StoreFailed(self._store.name, f"{type(exc).__name__}: {exc}"))

    def _emit(self, event: Event) -> None:
        # A broken metrics or log hook must never cost a slot or a refund.
        try:
            self._on_event(event)
        except Exception:
            _log.exception("admission event hook failed for %r", event)
