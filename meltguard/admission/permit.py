"""The permit an admission grants: leave to run one job, settled exactly once.

    permit = await gate.admit(caller, ask)      # raises ServiceError when refused
    async with permit:                          # settles on the way out
        images = await engine.generate(permit.job)

Leaving the block normally settles `success` with the time spent inside it (call
`permit.settle("success", seconds=...)` inside the block to report the engine's own timing);
an exception settles through the strategy's `outcome_of` (by default: CancelledError ->
`ignored`, ServiceError(gpu_out_of_memory) -> `dropped`, anything else -> `failed`). Only
`success` keeps the quota charge; the others refund it. `settle` is synchronous, so it is safe
in a `finally` during cancellation: the slot is released at once and the refund runs as a task
the strategy tracks (`drain()` awaits those at shutdown).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType

from meltguard.admission.auth import Caller
from meltguard.admission.events import OUTCOMES, Outcome
from meltguard.errors import ErrorCode, ServiceError
from meltguard.protocols import Clock
from meltguard.values import GenerationJob, QuotaOutcome

SettleHook = Callable[["Permit", Outcome, "float | None"], None]


def default_outcome_of(exc: BaseException) -> Outcome:
    if isinstance(exc, asyncio.CancelledError):
        return "ignored"
    if isinstance(exc, ServiceError) and exc.code == ErrorCode.GPU_OUT_OF_MEMORY:
        return "dropped"
    return "failed"


class Permit:
    """Leave to run one job. Settle it once: `success`, `dropped` (GPU out of memory),
    `ignored` (client left) or `failed`; a second settle does nothing."""

    def __init__(
        self,
        caller: Caller,
        job: GenerationJob,
        *,
        cost: float,
        degraded: tuple[str, ...] = (),
        waited: float = 0.0,
        quota: QuotaOutcome | None = None,
        charged: float = 0.0,
        charged_at: float = 0.0,
        on_settle: SettleHook,
        clock: Clock,
        outcome_of: Callable[[BaseException], Outcome] = default_outcome_of,
    ) -> None:
        self.caller = caller
        self.job = job
        self.cost = cost
        self.degraded = degraded
        self.waited = waited
        self.quota = quota  # None when nothing was counted (no store answer, or a baseline)
        self.charged = charged  # reference images charged; what a refund gives back
        self.charged_at = charged_at
        self._on_settle = on_settle
        self._clock = clock
        self._outcome_of = outcome_of
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
        on success."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")
        if self._outcome is not None:
            return
        self._outcome = outcome
        self._on_settle(self, outcome, seconds)

    async def __aenter__(self) -> Permit:
        self._entered_at = self._clock.monotonic()
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
            seconds = None if started is None else self._clock.monotonic() - started
            self.settle("success", seconds)
        else:
            self.settle(self._outcome_of(exc))
