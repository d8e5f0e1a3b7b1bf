"""The gate's events turned into Prometheus series and structlog lines.

Two things make this more than a dispatch table, both for the request path's sake:

- Events are applied at the end of the event-loop turn they were emitted in, all of the turn's
  together, each in the context it was emitted in (request id, tenant, tier). Every request
  writes its answer to a socket, and the kernel's work there evicts the CPU caches, so metrics
  and log lines done between two writes run on cold caches at several times their warm cost.
  A request's events are applied before its answer reaches the client's side of the loop, so
  nothing that reads metrics or logs after a response can tell. Outside a running loop an
  event is applied at once.
- Refusals repeated within a second are folded into one line. A tenant flooding the daemon
  after its quota ran out gets the same answer thousands of times a second; the first
  refusal of each (tenant, tier, reason, pressure level) is logged in full, the ones that
  follow within `FOLD_SECONDS` are counted and written as one `admission.decided` line with
  `repeated` (how many) and `cost` (their total) when the second is over. Metrics count every
  decision, and the access line (`http.request`) still records every request.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable

import structlog

from meltguard.admission.events import Decided, Event, Settled, StoreFailed, Waited
from meltguard.admission.policy import Level
from meltguard.daemon.metrics import CounterChild, Metrics

log = structlog.get_logger("meltguard")
_log = logging.getLogger(__name__)

FOLD_SECONDS = 1.0

_FoldKey = tuple[str, str, str, Level]  # tenant, tier, reason, pressure level


class _Fold:
    """Refusals folded into one line: how many, their total cost, and the counter each one
    still increments at once."""

    __slots__ = ("cost", "count", "counter")

    def __init__(self, counter: CounterChild | None) -> None:
        self.count = 0
        self.cost = 0.0
        self.counter = counter


class AdmissionEvents:
    """The daemon's event sink: `on_event` is what the gate calls."""

    def __init__(
        self, metrics: Callable[[], Metrics | None], *, fold_seconds: float = FOLD_SECONDS
    ) -> None:
        self._metrics = metrics  # read late: the app attaches its Metrics after the gate exists
        self._fold_seconds = fold_seconds
        self._pending: list[tuple[contextvars.Context, Event]] = []
        self._pending_loop: asyncio.AbstractEventLoop | None = None
        self._folds: dict[_FoldKey, _Fold] = {}  # key -> [count, total cost]
        self._fold_timer: asyncio.TimerHandle | None = None

    def on_event(self, event: Event) -> None:
        if isinstance(event, Settled) and not event.refunded:
            return  # a success without a refund says nothing a series or a line reports
        if isinstance(event, Decided) and self._folds and self._fold_now(event):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._apply(event, None)
            return
        # Keyed by loop: a loop that closed with events pending must not hold up later ones.
        if self._pending_loop is not loop:
            self._pending_loop = loop
            loop.call_soon(self._apply_pending, loop)
        self._pending.append((contextvars.copy_context(), event))

    def flush(self) -> None:
        """Write the folded refusals now (at shutdown, or before reading the log)."""
        if self._fold_timer is not None:
            self._fold_timer.cancel()
            self._fold_timer = None
        folds, self._folds = self._folds, {}
        # In an empty context: a summary belongs to no single request, so it must not pick up
        # the request id or tenant of whichever request happens to be current.
        contextvars.Context().run(self._write_folds, folds)

    @staticmethod
    def _write_folds(folds: dict[_FoldKey, _Fold]) -> None:
        for (tenant, tier, reason, level), fold in folds.items():
            if fold.count:
                log.bind().info(
                    "admission.decided", tier=tier, tenant=tenant, decision="reject",
                    reason=reason, pressure=level.label, cost=round(fold.cost, 4), wait_s=0.0,
                    degraded=None, repeated=fold.count,
                )

    def _apply_pending(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pending_loop = None
        pending, self._pending = self._pending, []
        for context, event in pending:
            try:
                context.run(self._apply, event, loop)
            except Exception:
                # As the gate does for a hook that fails in line: never lose the others.
                _log.exception("admission event hook failed for %r", event)

    def _apply(self, event: Event, loop: asyncio.AbstractEventLoop | None) -> None:
        metrics = self._metrics()
        if isinstance(event, Decided):
            if self._fold_now(event):
                return
            if metrics is not None:
                metrics.decided(event.tier, event.decision, event.reason)
            if event.decision == "reject" and loop is not None:
                self._open_fold(event, loop, metrics)
            # bind() hands back the cached logger once logging is configured, without the
            # proxy's per-call attribute lookup: this line is written for every request.
            log.bind().info(
                "admission.decided",
                tier=event.tier,
                tenant=event.tenant,
                decision=event.decision,
                reason=event.reason,
                pressure=event.level.label,
                cost=round(event.cost, 4),
                wait_s=round(event.wait_s, 4),
                degraded=list(event.degraded) if event.degraded else None,
            )
        elif isinstance(event, Waited):
            if metrics is not None:
                metrics.waited(event.tier, event.seconds)
        elif isinstance(event, Settled):
            log.info("quota.refunded", tier=event.tier, outcome=event.outcome,
                     cost=round(event.refunded, 4))
        elif isinstance(event, StoreFailed):
            if metrics is not None:
                metrics.store_errors.labels(event.store).inc()
            log.error("quota_store.failed", store=event.store, error=event.error)

    def _fold_now(self, event: Decided) -> bool:
        """True when the refusal joins an open fold: counted, with no line of its own (so
        `on_event` need not defer it either)."""
        if event.decision != "reject":
            return False
        fold = self._folds.get((event.tenant, event.tier, event.reason, event.level))
        if fold is None:
            return False
        fold.count += 1
        fold.cost += event.cost
        if fold.counter is not None:
            fold.counter.inc()
        return True

    def _open_fold(
        self, event: Decided, loop: asyncio.AbstractEventLoop, metrics: Metrics | None
    ) -> None:
        """This refusal gets its own line; the same ones in the next second join its fold."""
        key = (event.tenant, event.tier, event.reason, event.level)
        self._folds[key] = _Fold(
            metrics.decision_counter(event.tier, event.decision, event.reason)
            if metrics is not None else None)
        if self._fold_timer is None:
            self._fold_timer = loop.call_later(self._fold_seconds, self._fold_due,
                                               context=contextvars.Context())

    def _fold_due(self) -> None:
        self._fold_timer = None
        self.flush()
