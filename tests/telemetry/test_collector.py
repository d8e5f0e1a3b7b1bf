"""The Prometheus collector, scraped through a fresh registry with generate_latest."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from meltguard.clock import FakeClock
from meltguard.daemon.catalog import series_names
from meltguard.daemon.telemetry.collector import register_telemetry_metrics
from meltguard.daemon.telemetry.errors import TelemetryError
from meltguard.daemon.telemetry.nvml import open_nvml
from meltguard.daemon.telemetry.sampler import Sampler
from meltguard.daemon.telemetry.samples import ThrottleUnknownSample
from meltguard.values import THROTTLE_REASONS, GpuSample
from tests.fakenvml import NOT_SUPPORTED, FakeNvml
from tests.telemetry.helpers import ScriptedSource, gpu

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(registry: CollectorRegistry) -> Series:
    text = generate_latest(registry).decode()
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return series


def names(series: Series) -> set[str]:
    return {name for name, _ in series}


def value(series: Series, name: str, **labels: str) -> float | None:
    return series.get(("meltguard_" + name, tuple(sorted(labels.items()))))


async def setup(
    samples: list[GpuSample], *, requested: str = "auto", kind: str = "nvml"
) -> tuple[Sampler, CollectorRegistry, FakeClock]:
    clock = FakeClock()
    sampler = Sampler(
        ScriptedSource([samples, TelemetryError("nvml_unknown")], kind=kind),
        clock=clock,
        stale_after=5.0,
    )
    await sampler.tick()
    registry = CollectorRegistry()
    register_telemetry_metrics(registry, sampler, clock=clock, requested=requested)
    return sampler, registry, clock


async def test_exports_every_field_per_gpu() -> None:
    full = gpu(
        0,
        temperature_c=81.5,
        slowdown_c=87.0,
        memory_used_bytes=20,
        memory_total_bytes=80,
        utilization=0.75,
        power_w=512.0,
        power_limit_w=700.0,
        throttle=frozenset({"hw_thermal"}),
    )
    sampler, registry, _ = await setup([full])
    series = scrape(registry)
    assert value(series, "gpu_temperature_celsius", gpu="0") == 81.5
    assert value(series, "gpu_slowdown_temperature_celsius", gpu="0") == 87.0
    assert value(series, "gpu_memory_used_bytes", gpu="0") == 20
    assert value(series, "gpu_memory_total_bytes", gpu="0") == 80
    assert value(series, "gpu_utilization_ratio", gpu="0") == 0.75
    assert value(series, "gpu_power_watts", gpu="0") == 512.0
    assert value(series, "gpu_power_limit_watts", gpu="0") == 700.0
    assert value(series, "gpu_throttle_active", gpu="0", reason="hw_thermal") == 1.0
    assert value(series, "gpu_throttle_active", gpu="0", reason="sw_thermal") == 0.0
    throttle = [k for k in series if k[0] == "meltguard_gpu_throttle_active"]
    assert len(throttle) == len(THROTTLE_REASONS)
    assert value(series, "telemetry_age_seconds") == 0.0
    assert value(series, "telemetry_source_info", source="nvml", requested="auto") == 1.0
    assert names(series) <= series_names()  # nothing outside the catalogue
    await sampler.stop()


async def test_absent_fields_lost_gpus_and_unknown_throttle_have_no_series() -> None:
    sparse = gpu(0, temperature_c=None, utilization=None, power_w=None)
    lost = GpuSample(index=1, uuid="GPU-1", name="x", taken_at=0.0, lost=True)
    unknown = ThrottleUnknownSample(index=2, uuid="GPU-2", name="y", taken_at=0.0, power_w=90.0)
    sampler, registry, _ = await setup([sparse, lost, unknown])
    series = scrape(registry)
    assert value(series, "gpu_temperature_celsius", gpu="0") is None
    assert value(series, "gpu_utilization_ratio", gpu="0") is None
    assert value(series, "gpu_slowdown_temperature_celsius", gpu="0") == 87.0
    assert not [k for k in series if ("gpu", "1") in k[1]]
    assert value(series, "gpu_power_watts", gpu="2") == 90.0
    throttle_gpus = {dict(k[1])["gpu"] for k in series if k[0] == "meltguard_gpu_throttle_active"}
    assert throttle_gpus == {"0"}
    await sampler.stop()


async def test_errors_age_and_staleness() -> None:
    sampler, registry, clock = await setup([gpu(0)], requested="replay:/tmp/x.csv", kind="replay")
    clock.advance(3.0)
    await sampler.tick()  # fails: nvml_unknown
    series = scrape(registry)
    assert value(series, "telemetry_errors_total", error="nvml_unknown") == 1.0
    assert value(series, "telemetry_age_seconds") == 3.0
    assert value(series, "gpu_temperature_celsius", gpu="0") == 60.0
    assert value(series, "telemetry_source_info", source="replay", requested="replay") == 1.0
    clock.advance(3.0)
    series = scrape(registry)
    # Stale: GPU series vanish (Prometheus marks them stale) rather than repeating old values.
    assert value(series, "gpu_temperature_celsius", gpu="0") is None
    assert value(series, "telemetry_age_seconds") == 6.0
    await sampler.stop()


async def test_not_supported_over_real_pynvml_yields_no_series(fake_nvml: FakeNvml) -> None:
    fake_nvml.update(
        {
            "0.utilization.error": NOT_SUPPORTED,
            "0.power.error": NOT_SUPPORTED,
            "1.clocks_event_reasons.error": NOT_SUPPORTED,
            "0.clocks_reasons": 0x4,
        }
    )
    clock = FakeClock()
    sampler = Sampler(open_nvml(clock=clock, environ={}), clock=clock)
    await sampler.tick()
    registry = CollectorRegistry()
    register_telemetry_metrics(registry, sampler, clock=clock, requested="nvml")
    series = scrape(registry)
    assert value(series, "gpu_utilization_ratio", gpu="0") is None
    assert value(series, "gpu_power_watts", gpu="0") is None
    assert value(series, "gpu_utilization_ratio", gpu="1") == 0.0  # supported and idle: a real 0
    assert value(series, "gpu_power_watts", gpu="1") == 70.0
    assert value(series, "gpu_throttle_active", gpu="0", reason="sw_power_cap") == 1.0
    assert value(series, "gpu_throttle_active", gpu="1", reason="sw_power_cap") is None
    await sampler.stop()


def test_registration_does_not_read_the_sampler() -> None:
    class Exploding:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"registration touched sampler.{name}")

    registry = CollectorRegistry()
    register_telemetry_metrics(registry, Exploding(), clock=FakeClock(), requested="sim")  # type: ignore[arg-type]


async def test_energy_counter_per_gpu_and_none_where_unsupported() -> None:
    counted = gpu(0, energy_j=12_345.5)
    uncounted = gpu(1, energy_j=None)
    sampler, registry, _ = await setup([counted, uncounted])
    series = scrape(registry)
    assert value(series, "gpu_energy_joules_total", gpu="0") == 12_345.5
    assert not [k for k in series if k[0] == "meltguard_gpu_energy_joules_total"
                and ("gpu", "1") in k[1]]
    assert names(series) <= series_names()
    await sampler.stop()
