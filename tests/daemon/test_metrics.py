"""The per-request series are recorded as plain counts and applied at the end of the loop turn;
a scrape that comes first applies them itself, so nothing is ever read stale."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, generate_latest

from meltguard.daemon.metrics import LiveView, Metrics


def _metrics() -> tuple[Metrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return Metrics(registry, LiveView), registry


def _value(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float | None:
    return registry.get_sample_value(name, labels)


def _applied(metric: Counter, labels: dict[str, str]) -> float:
    """What the series itself holds, read without a registry scrape (which would apply)."""
    [family] = metric.collect()
    return next(sample.value for sample in family.samples
                if sample.name.endswith("_total") and sample.labels == labels)


async def test_updates_are_applied_at_the_end_of_the_turn() -> None:
    metrics, registry = _metrics()
    for _ in range(3):
        metrics.decided("pro", "admit", "ok")
        metrics.request_done("pro", 200)
    metrics.waited("pro", 0.3)
    metrics.waited("pro", 2.0)
    labels = {"tier": "pro", "decision": "admit", "reason": "ok", "endpoint": "generations"}
    metrics.decisions.labels("pro", "admit", "ok", "generations")
    assert _applied(metrics.decisions, labels) == 0.0  # nothing applied yet within this turn
    await asyncio.sleep(0)
    assert _applied(metrics.decisions, labels) == 3.0
    assert _value(registry, "meltguard_requests_total", {"tier": "pro", "code": "200"}) == 3.0
    assert _value(registry, "meltguard_queue_wait_seconds_count", {"tier": "pro"}) == 2.0
    assert _value(registry, "meltguard_queue_wait_seconds_sum", {"tier": "pro"}) == 2.3
    assert _value(registry, "meltguard_queue_wait_seconds_bucket",
                  {"tier": "pro", "le": "0.5"}) == 1.0


async def test_a_scrape_within_the_turn_sees_every_update() -> None:
    metrics, registry = _metrics()
    metrics.decided("free", "reject", "daily_quota_exceeded")
    text = generate_latest(registry).decode()
    assert ('meltguard_admission_decisions_total{decision="reject",endpoint="generations",'
            'reason="daily_quota_exceeded",tier="free"} 1.0') in text
    await asyncio.sleep(0)  # the turn's own flush finds nothing left to apply
    assert _value(registry, "meltguard_admission_decisions_total",
                  {"tier": "free", "decision": "reject", "endpoint": "generations",
                   "reason": "daily_quota_exceeded"}) == 1.0


def test_outside_a_loop_updates_apply_at_once() -> None:
    metrics, registry = _metrics()
    metrics.request_done("none", 404)
    assert _applied(metrics.requests, {"tier": "none", "code": "404"}) == 1.0
    assert _value(registry, "meltguard_requests_total", {"tier": "none", "code": "404"}) == 1.0
