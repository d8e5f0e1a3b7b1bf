"""What the gate tells the outside world. The daemon turns these into metrics and log lines;
admission itself never touches prometheus_client or structlog.

Exactly one `Decided` is emitted per `Gate.decide` call that reaches a decision, so
`admission_decisions_total` counts requests once:
- `admit`: runs as asked, without waiting for a slot;
- `queue`: runs as asked after waiting in the queue (wait_s > 0);
- `degrade`: runs with fewer steps / a smaller size / fewer images (`degraded` says which),
  whether or not it also waited (wait_s tells);
- `reject`: refused; `reason` is the ErrorCode string the client got;
- `would_reject` / `would_degrade`: shadow mode; admitted unchanged, `reason` is what
  enforcement would have answered (`ok` for a would-be degradation).
`reason` is `ok` for admissions, `fail_open` when the quota store failed and the policy says
to admit anyway. Every admission (any decision but `reject`) passed the queue, and its
`wait_s` is its stay there, zero when a slot was free. A stay in the queue that ends without
an admission is a `Waited`: a queue timeout or a shed waiter (each followed by its `reject`),
or a client that left while queued, which reaches no decision and shows up as `Waited` plus
`Settled(outcome="ignored")`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from meltguard.admission.policy import Level

Decision = Literal["admit", "degrade", "queue", "reject", "would_reject", "would_degrade"]
Outcome = Literal["success", "dropped", "ignored", "failed"]

DECISIONS: tuple[Decision, ...] = (
    "admit", "degrade", "queue", "reject", "would_reject", "would_degrade",
)
OUTCOMES: tuple[Outcome, ...] = ("success", "dropped", "ignored", "failed")
REASON_OK = "ok"
REASON_FAIL_OPEN = "fail_open"


@dataclass(frozen=True, slots=True)
class Decided:
    tier: str
    tenant: str
    decision: Decision
    reason: str  # an ErrorCode value, "ok" or "fail_open"
    level: Level
    cost: float  # reference images the job costs (0 when refused before it was costed)
    wait_s: float  # seconds spent waiting for a slot
    degraded: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Waited:
    """A stay in the queue that ended without an admission: timed out, shed, or abandoned.
    (An admission's stay is its Decided's wait_s.)"""

    tier: str
    seconds: float


@dataclass(frozen=True, slots=True)
class StoreFailed:
    store: str  # QuotaStore.name
    error: str  # exception type and message, for the log line


@dataclass(frozen=True, slots=True)
class Settled:
    tier: str
    outcome: Outcome
    refunded: float  # reference images given back to the quota


Event = Decided | Waited | StoreFailed | Settled
EventSink = Callable[[Event], None]
