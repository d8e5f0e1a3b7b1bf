"""The gate's events turned into Prometheus series and structlog lines.

One line per HTTP request. The edge opens a `RequestLine` when a request arrives and writes it
when the answer goes out; the gate's decision for that request joins it, so a decided request
is logged once, as `admission.decided`, with the decision and the answer (method, path,
status, ms) together. Every other request is logged as `http.request`. A decision made outside
an HTTP request (the simulator, a test driving the gate) gets a line of its own.
"""

from __future__ import annotations

import contextvars
import logging

import structlog

from meltguard.admission.auth import Caller
from meltguard.admission.events import Decided, Event, Settled, StoreFailed, Waited
from meltguard.daemon.metrics import Metrics

log = structlog.get_logger("meltguard")
_log = logging.getLogger(__name__)


def _decision_fields(event: Decided) -> dict[str, object]:
    return {
        "tier": event.tier,
        "tenant": event.tenant,
        "decision": event.decision,
        "reason": event.reason,
        "pressure": event.level.label,
        "cost": round(event.cost, 4),
        "wait_s": round(event.wait_s, 4),
        "degraded": list(event.degraded) if event.degraded else None,
    }


class RequestLine:
    """The one log line of an HTTP request, and the decision that joins it."""

    __slots__ = ("decided", "endpoint")

    def __init__(self) -> None:
        self.decided: Decided | None = None
        self.endpoint = "generations"  # the images route that asked: generations or edits

    def write(self, method: str, path: str, status: int, caller: Caller | None,
              ms: float) -> None:
        answer = {"method": method, "path": path, "status": status}
        if self.decided is not None:
            log.info("admission.decided", endpoint=self.endpoint, **answer, ms=ms,
                     **_decision_fields(self.decided))
        elif caller is None:
            log.info("http.request", **answer, tier="none", ms=ms)
        else:
            log.info("http.request", **answer, tier=caller.tier, tenant=caller.tenant, ms=ms)


_CURRENT: contextvars.ContextVar[RequestLine | None] = contextvars.ContextVar(
    "meltguard_request_line", default=None)


def open_request_line() -> RequestLine:
    """A new line for the request being served in this context (the edge calls this first)."""
    line = RequestLine()
    _CURRENT.set(line)
    return line


def set_endpoint(endpoint: str) -> None:
    """Name the images route serving this request, for its decision's line and series."""
    line = _CURRENT.get()
    if line is not None:
        line.endpoint = endpoint


class AdmissionEvents:
    """The daemon's event sink: `on_event` is what the gate calls."""

    def __init__(self) -> None:
        # Attached by the app (Runtime.metrics) after the gate exists; until then, lines only.
        self.metrics: Metrics | None = None

    def on_event(self, event: Event) -> None:
        # A broken metrics backend or log sink must not take the others down with it.
        try:
            self._apply(event)
        except Exception:
            _log.exception("admission event hook failed for %r", event)

    def _apply(self, event: Event) -> None:
        metrics = self.metrics
        if isinstance(event, Decided):
            line = _CURRENT.get()
            if metrics is not None:
                # An admission's stay in the queue, zero when a slot was free (see events.py).
                metrics.decided(event.tier, event.decision, event.reason,
                                None if event.decision == "reject" else event.wait_s,
                                line.endpoint if line is not None else "generations")
            if line is not None and line.decided is None:
                line.decided = event  # the request's own line reports it
            else:
                log.info("admission.decided", **_decision_fields(event))
        elif isinstance(event, Waited):
            if metrics is not None:
                metrics.waited(event.tier, event.seconds)
        elif isinstance(event, Settled):
            if event.refunded:
                # Asked for, not yet done: the store logs when the refund lands.
                log.info("quota.refund_requested", tier=event.tier, outcome=event.outcome,
                         cost=round(event.refunded, 4))
        elif isinstance(event, StoreFailed):
            if metrics is not None:
                metrics.store_errors.labels(event.store).inc()
            log.error("quota_store.failed", store=event.store, error=event.error)
