"""Prometheus exporter: event-driven series from admission events and HTTP outcomes, and
scrape-time gauges read from the live state, all on an injected registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meltguard.daemon.bulk_histogram import BulkHistogram
from meltguard.daemon.catalog import BY_NAME, PREFIX, MetricSpec
from meltguard.daemon.loop_turn import EndOfTurn


def _spec(name: str) -> MetricSpec:
    return BY_NAME[PREFIX + name]


def _counter(name: str, registry: CollectorRegistry) -> Counter:
    spec = _spec(name)
    return Counter(spec.full_name, spec.help, spec.labels, registry=registry)


def _histogram(name: str, registry: CollectorRegistry) -> Histogram:
    spec = _spec(name)
    return Histogram(spec.full_name, spec.help, spec.labels, buckets=spec.buckets,
                     registry=registry)


@dataclass(frozen=True, slots=True)
class LiveView:
    """What the scrape-time collector reads; the app assembles it from the gate and pressure."""

    queue_depth: Mapping[str, int] = field(default_factory=dict)
    inflight: Mapping[str, int] = field(default_factory=dict)
    quota_factor: Mapping[str, float] = field(default_factory=dict)
    queue_wait_budget: Mapping[str, float] = field(default_factory=dict)
    concurrency_limit: float = 0.0
    pressure_levels: Mapping[str, int] = field(default_factory=dict)  # gpu index or "all"
    enter_temperatures: Mapping[str, float] = field(default_factory=dict)  # level -> celsius
    policy_mode: str = "enforce"
    policy_sha256: str = ""


class _LiveCollector(Collector):
    def __init__(self, view: Callable[[], LiveView]) -> None:
        self._view = view

    def collect(self) -> Iterable[Metric]:
        view = self._view()
        yield _gauge("queue_depth", view.queue_depth)
        yield _gauge("inflight_requests", view.inflight)
        yield _gauge("quota_factor", view.quota_factor)
        yield _gauge("queue_wait_budget_seconds", view.queue_wait_budget)
        yield _gauge("pressure_level", view.pressure_levels)
        yield _gauge("pressure_enter_temperature_celsius", view.enter_temperatures)
        limit = GaugeMetricFamily(PREFIX + "concurrency_limit", _spec("concurrency_limit").help)
        limit.add_metric([], view.concurrency_limit)
        yield limit
        info = _spec("policy_info")
        family = GaugeMetricFamily(info.full_name, info.help, labels=info.labels)
        family.add_metric([view.policy_mode, view.policy_sha256], 1.0)
        yield family

    def describe(self) -> Iterable[Metric]:
        return []


def _gauge(name: str, values: Mapping[str, float]) -> GaugeMetricFamily:
    spec = _spec(name)
    family = GaugeMetricFamily(spec.full_name, spec.help, labels=spec.labels)
    for label, value in values.items():
        family.add_metric([label], float(value))
    return family


class _Pending(Collector):
    """Registered before the series it feeds, since a registry collects in registration
    order: a scrape applies what the request path has recorded so far, and sees it."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush

    def collect(self) -> Iterable[Metric]:
        self._flush()
        return []

    def describe(self) -> Iterable[Metric]:
        return []


class Metrics:
    """The series. Those updated on every request (requests, decisions, queue waits) are
    recorded as plain counts and applied to their prometheus_client series at the end of the
    event-loop turn, or when a scrape comes first: an update costs a dict increment on the
    request path instead of a lock and a bucket search, and the turn's updates are applied
    together. Outside a running loop they are applied at once."""

    def __init__(self, registry: CollectorRegistry, view: Callable[[], LiveView]) -> None:
        self.registry = registry
        registry.register(_Pending(self.flush))
        self.decisions = _counter("admission_decisions", registry)
        self.requests = _counter("requests", registry)
        # Bucket counts of its own: a flood of admissions waits the same zero seconds, and a
        # loop turn's are added in one step (see bulk_histogram).
        wait = _spec("queue_wait_seconds")
        self.queue_wait = BulkHistogram(wait.full_name, wait.help, wait.labels, wait.buckets)
        registry.register(self.queue_wait)
        self.generation = _histogram("generation_seconds", registry)
        self.images = _counter("images_generated", registry)
        self.policy_reloads = _counter("policy_reloads", registry)
        self.store_errors = _counter("quota_store_errors", registry)
        registry.register(_LiveCollector(view))
        # `labels(...)` takes the metric's lock and validates the values on every call; the
        # flush keeps the children it has seen. Label values come from the policy (tiers) and
        # fixed vocabularies (decisions, reasons, status codes), so these stay small.
        self._decided: dict[tuple[str, str, str, str], Counter] = {}
        self._requests: dict[tuple[str, int], Counter] = {}
        self._pending_decided: dict[tuple[str, str, str, str], int] = {}
        self._pending_requests: dict[tuple[str, int], int] = {}
        self._pending_waits: dict[tuple[str, float], int] = {}  # (tier, seconds) -> count
        self._end_of_turn = EndOfTurn(self.flush)

    def decided(self, tier: str, decision: str, reason: str,
                waited: float | None = None, endpoint: str = "generations") -> None:
        """One decision; `waited` is an admission's stay in the queue (zero when a slot was
        free), recorded with it."""
        pending = self._pending_decided
        key = (tier, decision, reason, endpoint)
        pending[key] = pending.get(key, 0) + 1
        if waited is not None:
            waits = self._pending_waits
            wait_key = (tier, waited)
            waits[wait_key] = waits.get(wait_key, 0) + 1
        self._end_of_turn.request()

    def request_done(self, tier: str, status: int) -> None:
        pending = self._pending_requests
        key = (tier, status)
        pending[key] = pending.get(key, 0) + 1
        self._end_of_turn.request()

    def waited(self, tier: str, seconds: float) -> None:
        waits = self._pending_waits
        waits[(tier, seconds)] = waits.get((tier, seconds), 0) + 1
        self._end_of_turn.request()

    def flush(self) -> None:
        """Apply the recorded updates to their series."""
        if self._pending_decided:
            pending, self._pending_decided = self._pending_decided, {}
            for key, count in pending.items():
                child = self._decided.get(key)
                if child is None:
                    child = self._decided[key] = self.decisions.labels(*key)
                child.inc(count)
        if self._pending_requests:
            requests, self._pending_requests = self._pending_requests, {}
            for (tier, status), count in requests.items():
                counter = self._requests.get((tier, status))
                if counter is None:
                    counter = self._requests[(tier, status)] = self.requests.labels(
                        tier, str(status))
                counter.inc(count)
        if self._pending_waits:
            waits, self._pending_waits = self._pending_waits, {}
            add = self.queue_wait.add
            for (tier, seconds), count in waits.items():
                add((tier,), seconds, count)

    def prime(self, tiers: Iterable[str], model: str, store: str) -> None:
        """Create zero-valued series up front so dashboards and rate() see them from the start."""
        for tier in tiers:
            self.images.labels(tier)
            self.queue_wait.labels(tier)
        self.generation.labels(model)
        self.store_errors.labels(store)
        for result in ("success", "failure"):
            self.policy_reloads.labels(result)
