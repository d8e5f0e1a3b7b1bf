"""The event-driven series land on the injected registry as they happen."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from meltguard.daemon.metrics import LiveView, Metrics


def _metrics() -> tuple[Metrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return Metrics(registry, LiveView), registry


def test_decisions_requests_and_waits_are_counted() -> None:
    metrics, registry = _metrics()
    for _ in range(3):
        metrics.decided("pro", "admit", "ok", 0.0)
        metrics.request_done("pro", 200)
    metrics.waited("pro", 0.3)
    metrics.decided("pro", "queue", "ok", 2.0)
    value = registry.get_sample_value
    assert value("meltguard_admission_decisions_total", {
        "tier": "pro", "decision": "admit", "reason": "ok", "endpoint": "generations"}) == 3.0
    assert value("meltguard_requests_total", {"tier": "pro", "code": "200"}) == 3.0
    assert value("meltguard_queue_wait_seconds_count", {"tier": "pro"}) == 5.0
    assert value("meltguard_queue_wait_seconds_sum", {"tier": "pro"}) == 2.3
    assert value("meltguard_queue_wait_seconds_bucket", {"tier": "pro", "le": "0.5"}) == 4.0


def test_a_refusal_records_no_wait() -> None:
    metrics, registry = _metrics()
    metrics.decided("free", "reject", "daily_quota_exceeded")
    text = generate_latest(registry).decode()
    assert ('meltguard_admission_decisions_total{decision="reject",endpoint="generations",'
            'reason="daily_quota_exceeded",tier="free"} 1.0') in text
    assert registry.get_sample_value("meltguard_queue_wait_seconds_count",
                                     {"tier": "free"}) is None


def test_prime_creates_zero_series() -> None:
    metrics, registry = _metrics()
    metrics.prime(["free"], "tiny", "memory")
    value = registry.get_sample_value
    assert value("meltguard_queue_wait_seconds_count", {"tier": "free"}) == 0.0
    assert value("meltguard_images_generated_total", {"tier": "free"}) == 0.0
    assert value("meltguard_quota_store_errors_total", {"store": "memory"}) == 0.0
