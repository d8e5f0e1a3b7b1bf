"""The power lever and the energy counter through NvmlSource, the real pynvml bindings and the
fake libnvidia-ml.so.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meltguard.admission.policy import Level, parse_policy
from meltguard.clock import FakeClock
from meltguard.daemon.power import PowerActuator
from meltguard.daemon.record import record
from meltguard.daemon.telemetry.nvml import NvmlSource, open_nvml
from meltguard.daemon.telemetry.replay import load_trace_file
from tests.fakenvml import GPU_IS_LOST, NO_PERMISSION, NOT_SUPPORTED, FakeNvml

NO_ENV: dict[str, str] = {}
E, H, C, N = Level.ELEVATED, Level.HIGH, Level.CRITICAL, Level.NORMAL
LADDER = parse_policy({"version": 1, "tiers": {"free": {"priority": 0}},
                       "power": {"elevated": 0.8, "high": 0.7, "critical": 0.6}})


@pytest.fixture
def source(fake_nvml: FakeNvml) -> Iterator[NvmlSource]:
    src = open_nvml(clock=FakeClock(), environ=NO_ENV)
    yield src
    src.close()


def test_energy_counter_is_read_in_joules(fake_nvml: FakeNvml, source: NvmlSource) -> None:
    fake_nvml.update({"0.energy_mj": 123_456_789, "1.energy_mj": 5})
    first, second = source.read()
    assert first.energy_j == pytest.approx(123_456.789)
    assert second.energy_j == pytest.approx(0.005)


def test_energy_not_supported_is_absent_not_zero(fake_nvml: FakeNvml, source: NvmlSource) -> None:
    fake_nvml.update({"0.energy.error": NOT_SUPPORTED, "0.energy_mj": 1000})
    first, second = source.read()
    assert first.energy_j is None
    assert second.energy_j == 0.0
    assert first.temperature_c is not None


def test_default_limit_and_range(fake_nvml: FakeNvml, source: NvmlSource) -> None:
    fake_nvml.update({"1.power_default_limit_mw": 350_000, "1.power_min_limit_mw": 150_000,
                      "1.power_max_limit_mw": 400_000})
    assert source.default_power_limit_w(0) == 700.0
    assert source.power_limit_range_w(0) == (200.0, 700.0)
    assert source.default_power_limit_w(1) == 350.0
    assert source.power_limit_range_w(1) == (150.0, 400.0)


def test_set_limit_is_in_force_and_read_back(fake_nvml: FakeNvml, source: NvmlSource) -> None:
    assert source.set_power_limit_w(0, 560.0) == "success"
    assert fake_nvml.limits_set(0) == [560_000]
    assert fake_nvml.limits_set(1) == []
    first, second = source.read()
    assert first.power_limit_w == 560.0
    assert second.power_limit_w == 700.0
    assert source.set_power_limit_w(0, 700.0) == "success"
    assert source.read()[0].power_limit_w == 700.0
    assert fake_nvml.limits_set(0) == [560_000, 700_000]


def test_unprivileged_set_is_named_and_changes_nothing(
    fake_nvml: FakeNvml, source: NvmlSource
) -> None:
    fake_nvml.update({"unprivileged": 1})
    assert source.set_power_limit_w(0, 560.0) == "nvml_no_permission"
    assert fake_nvml.limits_set(0) == []
    assert source.read()[0].power_limit_w == 700.0
    # Reading the lever's bounds needs no privilege.
    assert source.default_power_limit_w(0) == 700.0


@pytest.mark.parametrize(
    ("error", "result"),
    [(NOT_SUPPORTED, "nvml_not_supported"), (NO_PERMISSION, "nvml_no_permission"),
     (GPU_IS_LOST, "nvml_gpu_is_lost")],
)
def test_set_refusals_are_named(
    fake_nvml: FakeNvml, source: NvmlSource, error: int, result: str
) -> None:
    fake_nvml.update({"0.set_power_limit.error": error})
    assert source.set_power_limit_w(0, 560.0) == result
    assert source.set_power_limit_w(1, 560.0) == "success"


def test_limit_outside_the_range_is_refused_by_the_driver(
    fake_nvml: FakeNvml, source: NvmlSource
) -> None:
    assert source.set_power_limit_w(0, 100.0) == "nvml_invalid_argument"
    assert fake_nvml.limits_set(0) == []


def test_unsupported_bounds_are_none(fake_nvml: FakeNvml, source: NvmlSource) -> None:
    fake_nvml.update({"0.power_default_limit.error": NOT_SUPPORTED,
                      "0.power_limit_constraints.error": NOT_SUPPORTED})
    assert source.default_power_limit_w(0) is None
    assert source.power_limit_range_w(0) is None


def test_a_gpu_not_watched_or_a_closed_source_has_no_lever(
    fake_nvml: FakeNvml, source: NvmlSource
) -> None:
    assert source.default_power_limit_w(7) is None
    assert source.set_power_limit_w(7, 500.0) == "nvml_no_handle"
    source.close()
    assert source.set_power_limit_w(0, 500.0) == "nvml_no_handle"
    assert fake_nvml.limits_set(0) == []


def test_over_real_pynvml_the_card_gets_the_ratios_of_its_default(fake_nvml: FakeNvml) -> None:
    fake_nvml.update({"1.power_default_limit_mw": 400_000, "1.power_min_limit_mw": 300_000})
    source = open_nvml(clock=FakeClock(), environ={})
    try:
        actuator = PowerActuator(source)
        actuator.follow({0: E, 1: C}, LADDER)
        assert fake_nvml.limits_set(0) == [560_000]
        assert fake_nvml.limits_set(1) == [300_000]  # 0.6 x 400 W clamped to the card's 300 W
        first, second = source.read()
        assert (first.power_limit_w, second.power_limit_w) == (560.0, 300.0)
        actuator.shutdown()
        assert fake_nvml.limits_set(0) == [560_000, 700_000]
        assert fake_nvml.limits_set(1) == [300_000, 400_000]
    finally:
        source.close()


def test_over_real_pynvml_unprivileged_is_refused_once(fake_nvml: FakeNvml) -> None:
    fake_nvml.update({"unprivileged": 1})
    source = open_nvml(clock=FakeClock(), environ={})
    try:
        actuator = PowerActuator(source)
        for level in (E, H, N, C):
            actuator.follow({0: level}, LADDER)
        assert actuator.changes == {(0, "nvml_no_permission"): 1}
        assert fake_nvml.limits_set(0) == []
    finally:
        source.close()


def test_the_energy_counter_is_recorded_and_replayed(fake_nvml: FakeNvml, tmp_path: Path) -> None:
    fake_nvml.update({"0.energy_mj": 7_654_321, "1.energy.error": NOT_SUPPORTED})
    clock = FakeClock()
    source = open_nvml(clock=clock, environ=NO_ENV)
    path = tmp_path / "trace.jsonl"
    with path.open("w") as out:
        record(source, out, clock=clock, sleep=clock.advance, interval=0.5, duration=0.5,
               header="energy")
    source.close()
    first, second = load_trace_file(path).frames[0].samples
    assert first.energy_j == pytest.approx(7654.321)
    assert second.energy_j is None
