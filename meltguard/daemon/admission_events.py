"""The gate's events turned into Prometheus series and structlog lines.

One line per HTTP request. The edge opens a `RequestLine` when a request arrives and writes it
when the answer goes out; a decision the gate makes for that request joins it, so a request
the gate decided on is logged once, as `admission.decided`, with the decision (tier, tenant,
decision, reason, pressure level, cost, wait, degradation) and the answer (method, path,
status, ms) together: the canonical line of the request. Every other request is logged as
`http.request`. A decision made outside an HTTP request (the simulator, the benchmarks, a
test driving the gate) gets a line of its own.

A decision's series are recorded when it is made (`Metrics` applies them at the end of the
loop turn). Lines not joined to a request, and the series that go with them, are applied at the
end of the event-loop turn they were emitted in, all of the turn's together, each in the
context it was emitted in (request id, tenant, tier): every request writes its answer to a
socket, and the kernel's work there evicts the CPU caches, so work done between two writes
runs at several times its warm cost. Outside a running loop an event is applied at once.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

import structlog

from meltguard.admission.auth import Caller
from meltguard.admission.events import Decided, Event, Settled, StoreFailed, Waited
from meltguard.daemon.loop_turn import EndOfTurn
from meltguard.daemon.metrics import Metrics

log = structlog.get_logger("meltguard")
_log = logging.getLogger(__name__)


class RequestLine:
    """The one log line of an HTTP request, and the decision that joins it."""

    __slots__ = ("decided", "endpoint")

    def __init__(self) -> None:
        self.decided: Decided | None = None
        self.endpoint = "generations"  # the images route that asked: generations or edits

    def write(self, method: str, path: str, status: int, caller: Caller | None,
              ms: float) -> None:
        decided = self.decided
        # bind() hands back the cached logger once logging is configured, without the proxy's
        # per-call attribute lookup: this line is written for every request.
        if decided is not None:
            _decision_logger(decided).info("admission.decided", endpoint=self.endpoint,
                                           method=method, path=path, status=status, ms=ms)
        elif caller is None:
            log.bind().info("http.request", method=method, path=path, status=status,
                            tier="none", ms=ms)
        else:
            log.bind().info("http.request", method=method, path=path, status=status,
                            tier=caller.tier, tenant=caller.tenant, ms=ms)


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


class _Bound:
    """The last decision's logger, its fields bound: a tenant admitted or refused again and
    again reports the same Decided (the gate reuses them), and a logger with the fields bound
    writes them without passing them as keywords on every line."""

    __slots__ = ("base", "event", "logger")

    def __init__(self) -> None:
        self.event: Decided | None = None
        self.base: object = None
        self.logger: Any = None


_last = _Bound()


def _decision_logger(event: Decided) -> Any:
    base = log.bind()
    last = _last
    # Keyed by the base logger too: without logger caching (tests, in-process CLI runs) a
    # reconfiguration hands out a new one, and the bound one must follow it.
    if event is last.event and base is last.base:
        return last.logger
    logger = base.bind(
        tier=event.tier,
        tenant=event.tenant,
        decision=event.decision,
        reason=event.reason,
        pressure=event.level.label,
        cost=round(event.cost, 4),
        wait_s=round(event.wait_s, 4),
        degraded=list(event.degraded) if event.degraded else None,
    )
    last.event, last.base, last.logger = event, base, logger
    return logger


class AdmissionEvents:
    """The daemon's event sink: `on_event` is what the gate calls."""

    def __init__(self) -> None:
        # Attached by the app (Runtime.metrics) after the gate exists; until then, lines only.
        self.metrics: Metrics | None = None
        self._pending: list[tuple[contextvars.Context, Event]] = []
        self._end_of_turn = EndOfTurn(self._apply_pending)

    def on_event(self, event: Event) -> None:
        if isinstance(event, Decided):
            line = _CURRENT.get()
            if line is not None and line.decided is None:
                # The request's line reports it; the series are counted now (_count, inline:
                # this runs for every decision).
                line.decided = event
                metrics = self.metrics
                if metrics is not None:
                    metrics.decided(event.tier, event.decision, event.reason,
                                    None if event.decision == "reject" else event.wait_s,
                                    line.endpoint)
                return
        elif isinstance(event, Settled) and not event.refunded:
            return  # a success without a refund says nothing a series or a line reports
        self._pending.append((contextvars.copy_context(), event))
        self._end_of_turn.request()

    def _count(self, event: Decided) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        # An admission's stay in the queue, zero when a slot was free (see events.py).
        metrics.decided(event.tier, event.decision, event.reason,
                        None if event.decision == "reject" else event.wait_s)

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, []
        for context, event in pending:
            try:
                context.run(self._apply, event)
            except Exception:
                # As the gate does for a hook that fails in line: never lose the others.
                _log.exception("admission event hook failed for %r", event)

    def _apply(self, event: Event) -> None:
        metrics = self.metrics
        if isinstance(event, Decided):
            self._count(event)
            _decision_logger(event).info("admission.decided")
        elif isinstance(event, Waited):
            if metrics is not None:
                metrics.waited(event.tier, event.seconds)
        elif isinstance(event, Settled):
            # Asked for, not yet done: the store wrapper logs quota.refunded when it is.
            log.info("quota.refund_requested", tier=event.tier, outcome=event.outcome,
                     cost=round(event.refunded, 4))
        elif isinstance(event, StoreFailed):
            if metrics is not None:
                metrics.store_errors.labels(event.store).inc()
            log.error("quota_store.failed", store=event.store, error=event.error)
