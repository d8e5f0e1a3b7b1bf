"""What the daemon needs of an admission strategy. The real `Gate` is one; the benchmark's
baselines (daemon/strategies.py) are others, so the daemon, its metrics and its log lines
treat them all alike."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from meltguard.admission.auth import Caller
from meltguard.admission.cost import ImageAsk
from meltguard.admission.permit import Permit
from meltguard.admission.policy import Level, Policy
from meltguard.errors import Refused
from meltguard.values import QuotaOutcome


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


class AdmissionStrategy(Protocol):
    @property
    def policy(self) -> Policy: ...

    @property
    def store_name(self) -> str:
        """The quota store's name (the `store` label of quota_store_errors_total)."""
        ...

    @property
    def overload_status(self) -> int:
        """The HTTP status of this strategy's `server_overloaded` (503 or 429)."""
        ...

    def set_policy(self, policy: Policy) -> None:
        """A live reload: decisions from now on follow `policy`."""
        ...

    def set_pressure(self, level: Level, cooling_eta: float) -> None:
        """The current pressure level and the estimated seconds until it drops."""
        ...

    def set_duty_budget(self, duty: float | None) -> None:
        """The share of time the GPU may be busy, pacing toward `pressure.hold` (None: no
        pacing)."""
        ...

    def authenticate(self, authorization_header: str | None, client_id: str) -> Caller:
        """The caller a request's Authorization header names; raises ServiceError (401)."""
        ...

    def is_admin(self, authorization_header: str | None) -> bool: ...

    async def decide(self, caller: Caller, ask: ImageAsk) -> Permit | Refused:
        """A permit to run the (possibly degraded) job, or the refusal; emits one `Decided`."""
        ...

    async def admit(self, caller: Caller, ask: ImageAsk) -> Permit:
        """`decide`, with the refusal raised as a ServiceError."""
        ...

    async def quota_status(self, caller: Caller) -> QuotaOutcome:
        """The caller's quota windows as they stand, charging nothing."""
        ...

    def retry_hint(self) -> float:
        """Retry-After for an overload the strategy did not decide itself (GPU OOM)."""
        ...

    def snapshot(self) -> GateSnapshot:
        """The state the scrape-time gauges and /admin/state read."""
        ...

    async def drain(self) -> None:
        """Wait for the outstanding refunds (at shutdown, after the last settle)."""
        ...
