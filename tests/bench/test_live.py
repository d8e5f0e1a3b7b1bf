"""The live benchmark against real daemon subprocesses: a smoke run of the whole harness, and
the offline simulator held against it on the same scenario.

Bounded: every point runs a few seconds of wall time at --speed 40.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
from pathlib import Path

import pytest

from meltguard.bench.outcome import PointResult
from meltguard.bench.runner import BenchConfig, prepare, run_point
from meltguard.bench.scenario import Scenario, arrivals, baseline_options
from meltguard.bench.simulate import SimSetup, simulate_point
from meltguard.cli import main

ROOT = Path(__file__).resolve().parents[2]
BENCH_POLICY = ROOT / "policies" / "bench.yaml"
SPEED = 40.0

pytestmark = pytest.mark.slow


def test_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    code = main(["bench", "--strategies", "meltguard,fixed-concurrency", "--loads", "2",
                 "--warmup", "20", "--duration", "40", "--speed", str(SPEED),
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("sustainable capacity:")  # printed before anything runs
    assert "| meltguard | 2x |" in printed and "| fixed-concurrency | 2x |" in printed
    document = json.loads((out / "results.json").read_text())
    assert [(p["strategy"], p["load"]) for p in document["points"]] == [
        ("meltguard", 2.0), ("fixed-concurrency", 2.0)]
    for point in document["points"]:
        assert sum(t["offered"] for t in point["tiers"].values()) > 0
    series = json.loads((out / "series.json").read_text())
    for point in series["points"]:
        assert point["telemetry"], "the /metrics sampler saw no temperature"
        assert point["telemetry"][-1][4] > 0, "no admission decisions were counted"
    assert document["config"]["capacity"]["sustainable_duty"] == pytest.approx(0.794, abs=1e-3)
    for name in ("results.md", "goodput_and_peak.png", "timeline_2x.png",
                 "requests-2x.jsonl", "policy-x40.yaml"):
        assert (out / name).stat().st_size > 0, name
    assert "![goodput_and_peak.png]" in (out / "results.md").read_text()


def _mean_temperature(result: PointResult, scenario: Scenario) -> float:
    return statistics.fmean(p.temperature_c for p in result.telemetry
                            if scenario.warmup_s <= p.t <= scenario.end_s)


@pytest.mark.parametrize(("strategy", "load"), [("meltguard", 5.0), ("none", 0.5)])
def test_simulate_agrees_with_the_live_benchmark(
    tmp_path: Path, strategy: str, load: float
) -> None:
    """Same policy, same arrivals, same thermal model: once through a daemon on the wall
    clock (time compressed), once through `simulate` in virtual time. The live run carries
    HTTP and scheduling overheads the model does not (a few ms of wall time, x40 in model
    seconds), hence tolerances rather than equality."""
    scenario = dataclasses.replace(Scenario(), warmup_s=60.0, duration_s=150.0)
    config = BenchConfig(scenario=scenario, strategies=(strategy,), loads=(load,), speed=SPEED,
                         policy_path=BENCH_POLICY, out=tmp_path)
    prepared = prepare(config)
    offered = arrivals(scenario, load, prepared.capacity)
    live = asyncio.run(run_point(strategy, load, offered, config, prepared,
                                 log_path=tmp_path / "daemon.log"))
    sim = simulate_point(SimSetup(loaded=prepared.loaded, scenario=scenario, requests=offered,
                                  strategy=strategy, load=load,
                                  options=baseline_options(prepared.capacity)),
                         prepared.capacity)

    hot_live, hot_sim = _mean_temperature(live, scenario), _mean_temperature(sim, scenario)
    assert hot_live == pytest.approx(hot_sim, abs=1.5), (
        "the live card runs hotter than the model for the same work: is the sim engine "
        "counting CPU time (PNG encoding) as GPU busy time? Compression multiplies it "
        "(docs/benchmark.md, 'Limits of this benchmark')")
    assert live.goodput_ratio == pytest.approx(sim.goodput_ratio, rel=0.15, abs=0.03)
    assert live.peak_c == pytest.approx(sim.peak_c, abs=2.0)
    assert live.throttled_s == pytest.approx(sim.throttled_s, abs=10.0)
    for name in ("free", "plus", "pro"):
        got, want = live.tier(name), sim.tier(name)
        assert got is not None and want is not None
        assert got.offered == want.offered  # the very same requests
        assert got.success_rate == pytest.approx(want.success_rate, abs=0.12), name
    # HTTP, the client and the shared CPU add milliseconds of wall time to each answer,
    # which compression multiplies by 40: latency agrees more loosely than the rest.
    assert live.p50_s == pytest.approx(sim.p50_s, abs=2.0)
