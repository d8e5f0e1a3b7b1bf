"""The simulated card's power lever and energy counter: a capped card draws its limit while it
works, settles cooler, slows by the published DVFS curve, and counts its joules."""

from __future__ import annotations

import pytest

from meltguard.clock import FakeClock
from meltguard.daemon.telemetry.dvfs import throughput_at
from meltguard.daemon.telemetry.simulated import SimGpuParams, SimulatedGpu
from meltguard.protocols import PowerLimits


def busy_always(clock: FakeClock) -> SimulatedGpu:
    start = clock.monotonic()
    return SimulatedGpu(clock=clock, busy_seconds=lambda: clock.monotonic() - start)


def settle(sim: SimulatedGpu, clock: FakeClock, seconds: float = 600.0) -> None:
    sim.read()
    for _ in range(int(seconds)):
        clock.advance(1.0)
        sim.read()


def test_it_is_a_power_lever_with_an_h100s_range() -> None:
    sim = SimulatedGpu(clock=FakeClock())
    assert isinstance(sim, PowerLimits)
    assert sim.default_power_limit_w(0) == 700.0
    assert sim.power_limit_range_w(0) == (200.0, 700.0)
    assert sim.set_power_limit_w(0, 100.0) == "nvml_invalid_argument"
    assert sim.set_power_limit_w(3, 500.0) == "nvml_no_handle"


def test_a_capped_card_draws_its_limit_and_settles_below_slowdown() -> None:
    clock = FakeClock()
    sim = busy_always(clock)
    assert sim.set_power_limit_w(0, 560.0) == "success"
    settle(sim, clock)
    sample = sim.read()[0]
    assert sample.power_w == pytest.approx(560.0)
    assert sample.power_limit_w == 560.0
    # 30 °C ambient + 0.1 °C/W x 560 W: just under the 87 °C slowdown, never throttled.
    assert sample.temperature_c == pytest.approx(86.0, abs=0.01)
    assert "hw_thermal" not in sample.throttle
    assert "sw_power_cap" in sample.throttle
    assert sim.slowdown_factor() == pytest.approx(1 / throughput_at(0.8))


def test_uncapped_full_duty_throttles_as_before() -> None:
    clock = FakeClock()
    sim = busy_always(clock)
    settle(sim, clock)
    sample = sim.read()[0]
    params = SimGpuParams()
    # The thermal saw-tooth: full draw until slowdown, the throttled draw until release.
    assert sample.power_w in (pytest.approx(params.max_w), pytest.approx(params.throttled_max_w))
    assert "sw_power_cap" not in sample.throttle
    assert sim.slowdown_factor() in (1.0, params.throttle_slowdown)


def test_the_limit_caps_the_draw_while_busy_not_the_average() -> None:
    clock = FakeClock()
    start = clock.monotonic()
    sim = SimulatedGpu(clock=clock, busy_seconds=lambda: (clock.monotonic() - start) * 0.5)
    sim.set_power_limit_w(0, 490.0)
    settle(sim, clock, 10)
    # Half the time at 490 W, half idle at 70 W.
    assert sim.read()[0].power_w == pytest.approx(280.0)


def test_the_energy_counter_integrates_the_draw_in_model_seconds() -> None:
    clock = FakeClock()
    sim = SimulatedGpu(clock=clock, speed=2.0)  # idle: 70 W
    first = sim.read()[0].energy_j
    clock.advance(50.0)
    second = sim.read()[0].energy_j
    assert first == 0.0
    assert second == pytest.approx(70.0 * 100.0)  # 50 real seconds are 100 model seconds
