"""Exports telemetry at scrape time, straight from the sampler's latest snapshot.

A custom Collector rather than Gauges set on every read: a field the GPU does not report simply
yields no series (never a stale or zero value), a GPU that disappears takes its series with it,
and a stale snapshot exports no GPU series at all, so Prometheus marks them stale instead of
graphing the last good temperature as if it were live. Names, help and labels come from the
metric catalogue so the exporter, dashboards and rules cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from meltguard.daemon.catalog import BY_NAME, PREFIX
from meltguard.daemon.telemetry.sampler import Sampler
from meltguard.daemon.telemetry.samples import throttle_known
from meltguard.daemon.telemetry.select import requested_label
from meltguard.protocols import Clock
from meltguard.values import THROTTLE_REASONS, GpuSample

# (catalogue name, how to read it from a sample) for the one-value-per-GPU gauges.
_GPU_GAUGES: tuple[tuple[str, Callable[[GpuSample], float | int | None]], ...] = (
    ("gpu_temperature_celsius", lambda s: s.temperature_c),
    ("gpu_slowdown_temperature_celsius", lambda s: s.slowdown_c),
    ("gpu_memory_used_bytes", lambda s: s.memory_used_bytes),
    ("gpu_memory_total_bytes", lambda s: s.memory_total_bytes),
    ("gpu_utilization_ratio", lambda s: s.utilization),
    ("gpu_power_watts", lambda s: s.power_w),
    ("gpu_power_limit_watts", lambda s: s.power_limit_w),
)


# Counters the card keeps itself; exported as read, so a driver reload shows as a counter reset.
_GPU_COUNTERS: tuple[tuple[str, Callable[[GpuSample], float | int | None]], ...] = (
    ("gpu_energy_joules", lambda s: s.energy_j),
)


def _gauge(name: str) -> GaugeMetricFamily:
    spec = BY_NAME[PREFIX + name]
    assert spec.kind == "gauge", f"{spec.full_name} is a {spec.kind} in the catalogue"
    return GaugeMetricFamily(spec.full_name, spec.help, labels=list(spec.labels))


def _counter(name: str) -> CounterMetricFamily:
    spec = BY_NAME[PREFIX + name]
    assert spec.kind == "counter", f"{spec.full_name} is a {spec.kind} in the catalogue"
    return CounterMetricFamily(spec.full_name, spec.help, labels=list(spec.labels))


class TelemetryCollector(Collector):
    def __init__(self, sampler: Sampler, *, clock: Clock, requested: str) -> None:
        self._sampler = sampler
        self._clock = clock
        self._requested = requested_label(requested)

    def describe(self) -> Iterable[Metric]:
        # Registration calls describe(); without it the registry would collect() at import time.
        for name, _ in _GPU_GAUGES:
            yield _gauge(name)
        for name, _ in _GPU_COUNTERS:
            yield _counter(name)
        yield _gauge("gpu_throttle_active")
        yield _gauge("telemetry_age_seconds")
        yield _counter("telemetry_errors")
        yield _gauge("telemetry_source_info")

    def collect(self) -> Iterable[Metric]:
        now = self._clock.monotonic()
        snapshot = self._sampler.latest
        samples: tuple[GpuSample, ...] = ()
        if snapshot is not None and not self._sampler.is_stale(now):
            samples = snapshot.samples
        for name, read in _GPU_GAUGES:
            family = _gauge(name)
            for sample in samples:
                value = None if sample.lost else read(sample)
                if value is not None:
                    family.add_metric([str(sample.index)], float(value))
            yield family
        for name, read in _GPU_COUNTERS:
            counter = _counter(name)
            for sample in samples:
                value = None if sample.lost else read(sample)
                if value is not None:
                    counter.add_metric([str(sample.index)], float(value))
            yield counter
        throttle = _gauge("gpu_throttle_active")
        for sample in samples:
            if throttle_known(sample):
                for reason in THROTTLE_REASONS:
                    active = 1.0 if reason in sample.throttle else 0.0
                    throttle.add_metric([str(sample.index), reason], active)
        yield throttle
        age = _gauge("telemetry_age_seconds")
        age.add_metric([], self._sampler.age(now))
        yield age
        errors = _counter("telemetry_errors")
        for error, count in sorted(self._sampler.error_counts.items()):
            errors.add_metric([error], float(count))
        yield errors
        info = _gauge("telemetry_source_info")
        info.add_metric([self._sampler.source.kind, self._requested], 1.0)
        yield info


def register_telemetry_metrics(
    registry: CollectorRegistry, sampler: Sampler, *, clock: Clock, requested: str
) -> TelemetryCollector:
    collector = TelemetryCollector(sampler, clock=clock, requested=requested)
    registry.register(collector)
    return collector
