"""The simulated GPU's thermal model, throttling and determinism."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meltguard.clock import FakeClock
from meltguard.daemon.telemetry.simulated import (
    SimGpuParams,
    SimulatedGpu,
    steady_state_temperature,
    sustainable_duty_cycle,
)
from meltguard.values import GpuSample

PARAMS = SimGpuParams()


def duty_busy(clock: FakeClock, duty: float) -> Callable[[], float]:
    """An engine busy `duty` of every real second since now."""
    start = clock.monotonic()
    return lambda: (clock.monotonic() - start) * duty


def run(sim: SimulatedGpu, clock: FakeClock, seconds: float, step: float = 1.0) -> list[GpuSample]:
    samples = [sim.read()[0]]
    for _ in range(round(seconds / step)):
        clock.advance(step)
        samples.append(sim.read()[0])
    return samples


def test_defaults_are_h100_like() -> None:
    assert PARAMS.power_limit_w == 700.0
    assert (PARAMS.slowdown_c, PARAMS.shutdown_c) == (87.0, 92.0)
    assert 30.0 <= PARAMS.tau_s <= 60.0
    assert steady_state_temperature(PARAMS, 1.0) > PARAMS.slowdown_c
    assert steady_state_temperature(PARAMS, 0.0) < 45.0
    assert steady_state_temperature(PARAMS, 0.5) < 78.0  # modest duty stays cool


def test_sustainable_duty_cycle_settles_exactly_at_slowdown() -> None:
    duty = sustainable_duty_cycle(PARAMS)
    assert 0.5 < duty < 0.95
    assert steady_state_temperature(PARAMS, duty) == pytest.approx(PARAMS.slowdown_c)


def test_full_duty_heats_past_slowdown_and_throttles_like_hardware() -> None:
    clock = FakeClock()
    sim = SimulatedGpu(clock=clock, busy_seconds=duty_busy(clock, 1.0))
    assert sim.slowdown_factor() == 1.0
    samples = run(sim, clock, 600)
    temps = [s.temperature_c or 0.0 for s in samples]
    assert temps[0] < 40.0
    # Clocks drop right at the threshold; reads a second apart may just miss the peak.
    assert max(temps) == pytest.approx(PARAMS.slowdown_c, abs=0.1)
    assert max(temps) <= PARAMS.slowdown_c
    assert max(temps) < PARAMS.shutdown_c
    throttled = [s for s in samples if "hw_thermal" in s.throttle]
    assert throttled, "full duty must reach thermal slowdown"
    assert all((s.power_w or 0.0) <= PARAMS.throttled_max_w for s in throttled)
    first_hot = next(i for i, s in enumerate(samples) if "hw_thermal" in s.throttle)
    # Heating from 37 °C toward 100 °C with τ = 40 s crosses 87 °C after τ·ln(63/13) ≈ 63 s.
    assert first_hot == pytest.approx(40 * math.log(63 / 13), abs=1.5)
    # It then saw-tooths between the release point and slowdown instead of running away.
    tail = temps[first_hot:]
    assert min(tail) >= PARAMS.slowdown_c - PARAMS.release_c - 1e-9
    assert any("hw_thermal" not in s.throttle for s in samples[first_hot:])
    assert samples[-1].utilization == pytest.approx(1.0)


def test_slowdown_factor_is_above_one_while_throttled() -> None:
    clock = FakeClock()
    sim = SimulatedGpu(
        clock=clock,
        busy_seconds=duty_busy(clock, 1.0),
        params=SimGpuParams(initial_c=86.9),
    )
    sim.read()
    clock.advance(5)
    sample = sim.read()[0]
    assert "hw_thermal" in sample.throttle
    assert sim.throttled
    assert 1.5 <= sim.slowdown_factor() <= 2.0


def test_stays_below_slowdown_at_the_sustainable_duty() -> None:
    clock = FakeClock()
    duty = sustainable_duty_cycle(PARAMS) - 0.02
    sim = SimulatedGpu(clock=clock, busy_seconds=duty_busy(clock, duty))
    samples = run(sim, clock, 20 * PARAMS.tau_s, step=2.0)
    assert all("hw_thermal" not in s.throttle for s in samples)
    final = samples[-1].temperature_c
    assert final == pytest.approx(steady_state_temperature(PARAMS, duty), abs=1e-3)
    assert final is not None and final < PARAMS.slowdown_c


def test_cools_when_idle() -> None:
    clock = FakeClock()
    sim = SimulatedGpu(clock=clock, params=SimGpuParams(initial_c=80.0))
    samples = run(sim, clock, 5 * PARAMS.tau_s, step=5.0)
    temps = [s.temperature_c or 0.0 for s in samples]
    assert temps == sorted(temps, reverse=True)
    assert temps[-1] < steady_state_temperature(PARAMS, 0.0) + 0.05 * (80.0 - 37.0)
    assert "gpu_idle" in samples[-1].throttle
    assert samples[-1].power_w == PARAMS.idle_w
    assert samples[-1].utilization == 0.0


def test_hot_start_throttles_until_it_cools_below_the_release_point() -> None:
    clock = FakeClock()
    sim = SimulatedGpu(clock=clock, params=SimGpuParams(initial_c=88.0))
    assert "hw_thermal" in sim.read()[0].throttle
    clock.advance(60)
    assert "hw_thermal" not in sim.read()[0].throttle


def test_integration_is_exact_whatever_the_read_interval() -> None:
    def final_temperature(step: float) -> float:
        clock = FakeClock()
        sim = SimulatedGpu(clock=clock, busy_seconds=duty_busy(clock, 0.6))
        return run(sim, clock, 120, step=step)[-1].temperature_c or 0.0

    assert final_temperature(0.5) == pytest.approx(final_temperature(120.0), abs=1e-9)


def test_integration_is_exact_across_throttle_switches() -> None:
    def trace(step: float) -> float:
        clock = FakeClock()
        sim = SimulatedGpu(clock=clock, busy_seconds=duty_busy(clock, 1.0))
        return run(sim, clock, 90, step=step)[-1].temperature_c or 0.0

    assert trace(0.25) == pytest.approx(trace(90.0), abs=1e-9)


def test_deterministic_under_fake_clock() -> None:
    def trace() -> list[GpuSample]:
        clock = FakeClock()
        busy = duty_busy(clock, 0.9)
        inflight = iter(range(10_000))
        sim = SimulatedGpu(clock=clock, busy_seconds=busy, inflight=lambda: next(inflight) % 3)
        return run(sim, clock, 300, step=0.5)

    assert trace() == trace()


def test_speed_compresses_thermal_time() -> None:
    fast_clock, slow_clock = FakeClock(), FakeClock()
    fast = SimulatedGpu(clock=fast_clock, busy_seconds=duty_busy(fast_clock, 1.0), speed=10.0)
    slow = SimulatedGpu(clock=slow_clock, busy_seconds=duty_busy(slow_clock, 1.0))
    fast_last = run(fast, fast_clock, 30, step=0.5)[-1]
    slow_last = run(slow, slow_clock, 300, step=5.0)[-1]
    assert fast.speed == 10.0
    assert fast_last.temperature_c == pytest.approx(slow_last.temperature_c, abs=1e-9)
    # Duty is a ratio of real times, so speed does not change it.
    assert fast_last.utilization == pytest.approx(1.0)


def test_memory_grows_with_inflight_work_and_is_capped() -> None:
    clock = FakeClock()
    inflight = 0
    sim = SimulatedGpu(clock=clock, inflight=lambda: inflight)
    idle = sim.read()[0]
    inflight = 4
    busy = sim.read()[0]
    inflight = 1000
    full = sim.read()[0]
    assert idle.memory_used_bytes == PARAMS.memory_base_bytes
    assert busy.memory_used_bytes == PARAMS.memory_base_bytes + 4 * PARAMS.memory_per_request_bytes
    assert full.memory_used_bytes == full.memory_total_bytes == PARAMS.memory_total_bytes


def test_first_read_and_repeated_reads_at_one_instant() -> None:
    clock = FakeClock(start=12.0)
    sim = SimulatedGpu(clock=clock, busy_seconds=duty_busy(clock, 1.0))
    first = sim.read()[0]
    again = sim.read()[0]
    assert first == again
    assert first.taken_at == 12.0
    assert (first.index, first.uuid, first.name) == (0, PARAMS.uuid, PARAMS.name)
    assert sim.kind == "simulated"
    sim.close()


def test_params_are_validated() -> None:
    with pytest.raises(ValueError, match="tau_s"):
        SimGpuParams(tau_s=0)
    with pytest.raises(ValueError, match="release_c"):
        SimGpuParams(release_c=0)
    with pytest.raises(ValueError, match="speed"):
        SimulatedGpu(clock=FakeClock(), speed=0)


@given(
    duty=st.floats(min_value=0.0, max_value=1.0),
    steps=st.lists(st.floats(min_value=0.01, max_value=120.0), min_size=1, max_size=30),
)
def test_temperature_stays_between_ambient_and_slowdown(duty: float, steps: list[float]) -> None:
    clock = FakeClock()
    sim = SimulatedGpu(clock=clock, busy_seconds=duty_busy(clock, duty), speed=3.0)
    sim.read()
    for step in steps:
        clock.advance(step)
        sample = sim.read()[0]
        assert sample.temperature_c is not None
        assert PARAMS.ambient_c <= sample.temperature_c <= PARAMS.slowdown_c + 1e-9
        assert sample.power_w is not None and sample.power_w <= PARAMS.power_limit_w
