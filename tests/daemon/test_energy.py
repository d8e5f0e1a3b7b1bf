"""The energy meter: the card's curve from its counter or its power, and each batch's share."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from meltguard.clock import FakeClock
from meltguard.daemon.energy import EnergyCollector, EnergyMeter
from meltguard.inference.sim import SimEngine, SimEngineParams
from meltguard.values import GenerationJob, GpuSample, Size


def sample(t: float, *, energy: float | None = None, power: float | None = None,
           index: int = 0, lost: bool = False) -> GpuSample:
    return GpuSample(index=index, uuid=f"GPU-{index}", name="x", taken_at=t, energy_j=energy,
                     power_w=power, lost=lost)


def job(n: int = 1, seed: int = 0) -> GenerationJob:
    return GenerationJob(prompt="p", size=Size(64, 64), steps=2, n=n, seed=seed)


def test_counter_is_interpolated_between_reads() -> None:
    meter = EnergyMeter()
    meter.observe([sample(10.0, energy=1000.0, power=100.0)])
    meter.observe([sample(11.0, energy=1300.0, power=300.0)])
    assert meter.joules_between(10.0, 11.0) == pytest.approx(300.0)
    assert meter.joules_between(10.25, 10.75) == pytest.approx(150.0)


def test_past_the_newest_read_it_extrapolates_at_the_newest_power() -> None:
    meter = EnergyMeter()
    meter.observe([sample(10.0, energy=1000.0, power=100.0)])
    meter.observe([sample(11.0, energy=1300.0, power=400.0)])
    assert meter.joules_between(10.5, 11.5) == pytest.approx(150.0 + 200.0)


def test_power_is_integrated_where_there_is_no_counter() -> None:
    meter = EnergyMeter()
    for t, watts in ((0.0, 100.0), (1.0, 300.0), (2.0, 300.0)):
        meter.observe([sample(t, power=watts)])
    assert meter.joules_between(0.0, 2.0) == pytest.approx(200.0 + 300.0)


def test_nothing_to_go_on_is_none() -> None:
    meter = EnergyMeter()
    assert meter.joules_between(0.0, 1.0) is None
    meter.observe([sample(0.0)])  # neither energy nor power
    assert meter.joules_between(0.0, 1.0) is None


def test_a_counter_reset_starts_a_new_curve() -> None:
    meter = EnergyMeter()
    meter.observe([sample(0.0, energy=5000.0)])
    meter.observe([sample(1.0, energy=5100.0)])
    meter.observe([sample(2.0, energy=10.0)])
    meter.observe([sample(3.0, energy=60.0)])
    assert meter.joules_between(2.0, 3.0) == pytest.approx(50.0)


def test_it_meters_the_lowest_gpu_and_skips_lost_reads() -> None:
    meter = EnergyMeter()
    meter.observe([sample(0.0, energy=0.0, index=2), sample(0.0, energy=0.0, index=1)])
    meter.observe([sample(1.0, energy=999.0, index=2), sample(1.0, energy=10.0, index=1)])
    meter.observe([sample(2.0, index=1, lost=True)])
    assert meter.gpu == 1
    assert meter.joules_between(0.0, 1.0) == pytest.approx(10.0)


def test_a_batch_is_split_by_images_and_counted_per_tier() -> None:
    meter = EnergyMeter()
    meter.observe([sample(0.0, energy=0.0)])
    meter.observe([sample(4.0, energy=400.0, power=100.0)])
    one, three, stranger = job(1, seed=1), job(3, seed=2), job(1, seed=3)
    with meter.metering(one, "free") as free, meter.metering(three, "pro") as pro:
        meter.batch_ran([one, three], 0.0, 4.0)
        # A job nobody metered (its request left before the batch ended) is skipped.
        meter.batch_ran([stranger], 0.0, 4.0)
    assert free.joules == pytest.approx(100.0)
    assert pro.joules == pytest.approx(300.0)
    assert meter.tier_joules == {"free": pytest.approx(100.0), "pro": pytest.approx(300.0)}
    # After the request is done its job is forgotten: a later batch does not count it.
    meter.batch_ran([one], 0.0, 4.0)
    assert meter.tier_joules["free"] == pytest.approx(100.0)


def test_equal_jobs_of_two_requests_are_told_apart() -> None:
    meter = EnergyMeter()
    meter.observe([sample(0.0, energy=0.0, power=50.0)])
    first, second = job(1, seed=7), job(1, seed=7)
    assert first == second
    with meter.metering(first, "free") as a, meter.metering(second, "pro") as b:
        meter.batch_ran([first], 0.0, 2.0)
    assert a.joules == pytest.approx(100.0)
    assert b.joules is None


def test_collector_exports_tier_joules() -> None:
    meter = EnergyMeter()
    meter.observe([sample(0.0, energy=0.0, power=10.0)])
    registry = CollectorRegistry()
    registry.register(EnergyCollector(meter))
    item = job()
    with meter.metering(item, "plus"):
        meter.batch_ran([item], 0.0, 1.5)
    text = generate_latest(registry).decode()
    assert 'meltguard_energy_joules_total{tier="plus"} 15.0' in text


async def test_the_engine_tells_the_meter_of_each_batch_before_its_results_return() -> None:
    clock = FakeClock(start=0.0)
    params = SimEngineParams(base_s=1.0)
    engine = SimEngine(clock=clock, params=params, max_batch=4)
    meter = EnergyMeter()
    engine.on_batch(meter.batch_ran)
    meter.observe([sample(0.0, energy=0.0, power=200.0)])
    jobs = [job(1, seed=1), job(2, seed=2)]

    async def request(item: GenerationJob, tier: str) -> float | None:
        with meter.metering(item, tier) as metered:
            await engine.generate(item)
        return metered.joules

    joules = await asyncio.gather(request(jobs[0], "free"), request(jobs[1], "pro"))
    # One batch of three images at 200 W, shared one image to two.
    batch = 200.0 * params.batch_seconds(Size(64, 64), 2, 3)
    assert joules == [pytest.approx(batch / 3), pytest.approx(batch * 2 / 3)]
    await engine.close()
