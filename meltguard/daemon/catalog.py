"""The metric catalogue as data: the exporter, docs/metrics.md, the dashboard and rule checks all
read it, so a metric that is not here does not exist."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PREFIX = "meltguard_"
Kind = Literal["counter", "gauge", "histogram", "info"]

# Queue waits run from milliseconds to the largest max_queue_wait (minutes).
WAIT_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
# A tiny CPU image takes ~0.1 s, an SDXL batch on a hot GPU tens of seconds.
GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # without prefix and without the _total suffix prometheus_client adds to counters
    kind: Kind
    labels: tuple[str, ...]
    unit: str
    help: str
    buckets: tuple[float, ...] = ()

    @property
    def full_name(self) -> str:
        return PREFIX + self.name

    @property
    def exported_names(self) -> tuple[str, ...]:
        """Series names as Prometheus stores them."""
        base = self.full_name
        if self.kind == "counter":
            return (base + "_total", base + "_created")
        if self.kind == "histogram":
            return (base + "_bucket", base + "_sum", base + "_count", base + "_created")
        return (base,)


CATALOG: tuple[MetricSpec, ...] = (
    MetricSpec("admission_decisions", "counter", ("tier", "decision", "reason", "endpoint"),
               "decisions", "Admission decisions: admit, degrade, queue, reject, would_reject, "
               "would_degrade; endpoint is generations or edits."),
    MetricSpec("requests", "counter", ("tier", "code"), "requests",
               "Requests answered, by tier and HTTP status code."),
    MetricSpec("queue_depth", "gauge", ("tier",), "requests",
               "Requests waiting for a generation slot."),
    MetricSpec("queue_wait_seconds", "histogram", ("tier",), "seconds",
               "Time admitted requests waited for a generation slot.", WAIT_BUCKETS),
    MetricSpec("generation_seconds", "histogram", ("model",), "seconds",
               "Wall time of one engine generation call.", GENERATION_BUCKETS),
    MetricSpec("images_generated", "counter", ("tier",), "images",
               "Images delivered to clients."),
    MetricSpec("inflight_requests", "gauge", ("tier",), "requests",
               "Requests holding a generation permit."),
    MetricSpec("concurrency_limit", "gauge", (), "requests",
               "Current global concurrency limit (backs off on GPU out-of-memory)."),
    MetricSpec("pressure_level", "gauge", ("gpu",), "level",
               "Pressure level: 0 normal, 1 elevated, 2 high, 3 critical; gpu=\"all\" is overall."),
    MetricSpec("queue_wait_budget_seconds", "gauge", ("tier",), "seconds",
               "The tier's max_queue_wait at the current level: the queue-wait alert's budget."),
    MetricSpec("pressure_enter_temperature_celsius", "gauge", ("level",), "celsius",
               "The policy's absolute temperature_c enter threshold per level, for dashboards."),
    MetricSpec("quota_factor", "gauge", ("tier",), "ratio",
               "Multiplier applied to the tier's quotas at the current level."),
    MetricSpec("gpu_temperature_celsius", "gauge", ("gpu",), "celsius", "GPU core temperature."),
    MetricSpec("gpu_slowdown_temperature_celsius", "gauge", ("gpu",), "celsius",
               "Temperature at which the card starts hardware slowdown."),
    MetricSpec("gpu_memory_used_bytes", "gauge", ("gpu",), "bytes", "GPU memory in use."),
    MetricSpec("gpu_memory_total_bytes", "gauge", ("gpu",), "bytes", "GPU memory in total."),
    MetricSpec("gpu_utilization_ratio", "gauge", ("gpu",), "ratio",
               "Fraction of the last sample period the GPU was busy."),
    MetricSpec("gpu_power_watts", "gauge", ("gpu",), "watts", "Power draw."),
    MetricSpec("gpu_power_limit_watts", "gauge", ("gpu",), "watts", "Enforced power limit."),
    MetricSpec("gpu_throttle_active", "gauge", ("gpu", "reason"), "boolean",
               "1 while the named clocks-event (throttle) reason is active."),
    MetricSpec("telemetry_age_seconds", "gauge", (), "seconds",
               "Age of the newest successful telemetry sample."),
    MetricSpec("telemetry_errors", "counter", ("error",), "errors",
               "Telemetry reads that failed, by error."),
    MetricSpec("telemetry_source_info", "gauge", ("source", "requested"), "info",
               "1 for the telemetry source in use (nvml, simulated, replay) and the one asked for "
               "(auto, nvml, sim, replay); source=simulated with requested=auto is a fallback."),
    MetricSpec("policy_reloads", "counter", ("result",), "reloads",
               "Policy reloads by result: success or failure."),
    MetricSpec("policy_info", "gauge", ("mode", "sha256"), "info",
               "1 for the policy in force: its mode and the SHA-256 of its file."),
    MetricSpec("quota_store_errors", "counter", ("store",), "errors",
               "Quota store calls that failed (the decision then follows on_store_error)."),
    MetricSpec("quota_store_up", "gauge", ("store",), "boolean",
               "1 while the quota store's last call worked, 0 while it fails (see /readyz)."),
    MetricSpec("quota_refunds_pending", "gauge", (), "refunds",
               "Refunds (and voids of unanswered charges) the quota store has not taken yet."),
    MetricSpec("quota_refunds", "counter", ("result",), "refunds",
               "Refund attempts by result: success (the store took it), retry (it failed and "
               "stays queued), dropped (the queue was full), abandoned (left at shutdown)."),
    MetricSpec("gpu_energy_joules", "counter", ("gpu",), "joules",
               "Energy the card has used since its driver loaded, from its own counter."),
    MetricSpec("power_limit_changes", "counter", ("gpu", "result"), "changes",
               "Power-limit changes the policy's power section asked for, by result: success, "
               "shadow (logged, not set) or the NVML refusal (nvml_no_permission, ...)."),
    MetricSpec("energy_joules", "counter", ("tier",), "joules",
               "GPU energy attributed to each tier: every batch's share of the card's energy "
               "while it ran, split by images."),
)

BY_NAME: dict[str, MetricSpec] = {spec.full_name: spec for spec in CATALOG}


def series_names() -> frozenset[str]:
    """Every series name Prometheus may hold for a catalogued metric."""
    return frozenset(name for spec in CATALOG for name in spec.exported_names)
