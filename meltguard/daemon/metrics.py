"""Prometheus exporter: event-driven series from admission events and HTTP outcomes, and
scrape-time gauges read from the live state, all on an injected registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meltguard.daemon.catalog import BY_NAME, PREFIX, MetricSpec


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


class Metrics:
    """The series, on an injected registry: counters and histograms updated as events happen,
    gauges read from the live state at scrape time."""

    def __init__(self, registry: CollectorRegistry, view: Callable[[], LiveView]) -> None:
        self.registry = registry
        self.decisions = _counter("admission_decisions", registry)
        self.requests = _counter("requests", registry)
        self.queue_wait = _histogram("queue_wait_seconds", registry)
        self.generation = _histogram("generation_seconds", registry)
        self.images = _counter("images_generated", registry)
        self.policy_reloads = _counter("policy_reloads", registry)
        self.store_errors = _counter("quota_store_errors", registry)
        registry.register(_LiveCollector(view))

    def decided(self, tier: str, decision: str, reason: str,
                waited: float | None = None, endpoint: str = "generations") -> None:
        """One decision; `waited` is an admission's stay in the queue (zero when a slot was
        free), recorded with it."""
        self.decisions.labels(tier, decision, reason, endpoint).inc()
        if waited is not None:
            self.queue_wait.labels(tier).observe(waited)

    def request_done(self, tier: str, status: int) -> None:
        self.requests.labels(tier, str(status)).inc()

    def waited(self, tier: str, seconds: float) -> None:
        self.queue_wait.labels(tier).observe(seconds)

    def prime(self, tiers: Iterable[str], model: str, store: str) -> None:
        """Create zero-valued series up front so dashboards and rate() see them from the start."""
        for tier in tiers:
            self.images.labels(tier)
            self.queue_wait.labels(tier)
        self.generation.labels(model)
        self.store_errors.labels(store)
        for result in ("success", "failure"):
            self.policy_reloads.labels(result)
