"""The `meltguard-power` strategy: the real gate under policies/bench-power.yaml (the bench policy
plus a power section), in the offline simulator and in the report, and the energy figures every
strategy gets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from meltguard.admission.gate import Gate
from meltguard.admission.policy import Level
from meltguard.admission.quota_memory import MemoryQuotaStore
from meltguard.bench.load import parse_metrics
from meltguard.bench.outcome import PointResult, TelemetryPoint, summarize
from meltguard.bench.power import DEFAULT_POWER_POLICY, POWER_STRATEGY, policy_for
from meltguard.bench.report import POWER_WORK_TARGET, evaluate, markdown_table
from meltguard.bench.runner import BenchConfig, prepare
from meltguard.bench.scenario import Scenario, arrivals, baseline_options, capacity
from meltguard.bench.simulate import SimSetup, simulate_point
from meltguard.cli import main
from meltguard.clock import FakeClock
from meltguard.daemon.policy_file import load_policy_file
from meltguard.daemon.strategies import make_gate

ROOT = Path(__file__).resolve().parents[2]
BENCH_POLICY = ROOT / "policies" / "bench.yaml"
POWER_POLICY = ROOT / "policies" / "bench-power.yaml"
SCENARIO = dataclasses.replace(Scenario(), warmup_s=60.0, duration_s=150.0)


def point(strategy: str, load: float) -> PointResult:
    cap = capacity(SCENARIO)
    policy = POWER_POLICY if strategy == POWER_STRATEGY else BENCH_POLICY
    setup = SimSetup(loaded=load_policy_file(policy), scenario=SCENARIO,
                     requests=arrivals(SCENARIO, load, cap), strategy=strategy, load=load,
                     options=baseline_options(cap))
    return simulate_point(setup, cap)


def test_the_power_policy_is_the_bench_policy_plus_the_lever() -> None:
    bench, powered = load_policy_file(BENCH_POLICY).policy, load_policy_file(POWER_POLICY).policy
    assert DEFAULT_POWER_POLICY == POWER_POLICY
    assert not bench.power
    assert powered.power == {"elevated": 0.8, "high": 0.72, "critical": 0.6}
    # The lever follows the level, so elevated enters under the hold line: a held card has it on.
    assert powered.pressure.hold is not None and bench.pressure.hold is not None
    enter = powered.pressure.levels["elevated"].enter.below_slowdown_c
    assert enter is not None and enter > powered.pressure.hold.below_slowdown_c
    # Everything else is the bench policy's.
    levels = dict(powered.pressure.levels)
    levels["elevated"] = bench.pressure.levels["elevated"]
    pressure = powered.pressure.model_copy(update={"levels": levels})
    assert powered.model_copy(update={"power": {}, "pressure": pressure}) == bench
    assert policy_for("meltguard", load_policy_file(BENCH_POLICY)).policy == bench


def test_the_power_strategy_refuses_a_policy_without_a_power_section(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="needs a policy with a `power` section"):
        policy_for(POWER_STRATEGY, load_policy_file(BENCH_POLICY))
    code = main(["simulate", "--policy", str(BENCH_POLICY), "--strategy", POWER_STRATEGY])
    assert code == 2
    assert "needs a policy with a `power` section" in capsys.readouterr().err


def test_the_strategy_is_the_real_gate() -> None:
    gate = make_gate(POWER_STRATEGY, load_policy_file(BENCH_POLICY).policy, MemoryQuotaStore(),
                     FakeClock(), on_event=lambda event: None)
    assert type(gate) is Gate


def test_in_the_model_the_lever_buys_work_and_saves_energy_at_10x() -> None:
    plain, powered = point("meltguard", 10.0), point(POWER_STRATEGY, 10.0)
    assert powered.throttled_s == 0 and plain.throttled_s == 0
    assert powered.work_ratio > plain.work_ratio + 0.15
    assert plain.joules_per_work is not None and powered.joules_per_work is not None
    assert powered.joules_per_work < 0.9 * plain.joules_per_work
    pro = powered.tier("pro")
    assert pro is not None and pro.success_rate >= 0.99
    # Every strategy gets its energy figure (none delivers nothing in time at 10x, so its
    # energy per full-quality image is undefined, but its energy is counted).
    assert point("none", 10.0).energy_j is not None


def test_the_simulator_caps_the_card_only_under_the_power_strategy() -> None:
    plain, powered = point("meltguard", 5.0), point(POWER_STRATEGY, 5.0)
    assert max(p.temperature_c for p in powered.telemetry) < max(
        p.temperature_c for p in plain.telemetry)
    assert Level.ELEVATED in {Level(p.level) for p in powered.telemetry}


def test_simulate_command_reports_energy(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--policy", str(POWER_POLICY), "--strategy", POWER_STRATEGY,
                 "--load", "10", "--duration", "60", "--warmup", "30"])
    assert code == 0
    out = capsys.readouterr().out
    assert "strategy meltguard-power" in out
    assert "J per full-quality image" in out


def test_window_energy_scales_the_counter_to_the_window() -> None:
    telemetry = [TelemetryPoint(t, 60.0, False, 0, energy_j=100.0 * t) for t in range(0, 301, 10)]
    result = summarize(strategy="meltguard", load=1.0, scenario=SCENARIO, capacity_ips=1.0,
                       requests=[], telemetry=telemetry)
    assert result.energy_j == pytest.approx(100.0 * SCENARIO.duration_s)
    assert result.joules_per_work is None  # no work delivered
    none = summarize(strategy="meltguard", load=1.0, scenario=SCENARIO, capacity_ips=1.0,
                     requests=[], telemetry=[TelemetryPoint(0.0, 60.0, False, 0)])
    assert none.energy_j is None


def test_the_scraper_reads_the_energy_counter() -> None:
    text = (
        'meltguard_gpu_temperature_celsius{gpu="0"} 71.5\n'
        'meltguard_gpu_energy_joules_total{gpu="0"} 12345.5\n'
        'meltguard_gpu_energy_joules_total{gpu="1"} 1.0\n'
    )
    parsed = parse_metrics(text, 3.0)
    assert parsed is not None and parsed.energy_j == 12345.5


def test_report_checks_the_power_target_and_shows_energy() -> None:
    powered = point(POWER_STRATEGY, 10.0)
    verdicts = [v for v in evaluate([powered], load_policy_file(BENCH_POLICY).policy,
                                    capacity(SCENARIO)) if v.subject.startswith(POWER_STRATEGY)]
    claims = {v.claim for v in verdicts}
    assert f"full-quality work >= {POWER_WORK_TARGET} x capacity" in claims
    assert "0 s throttled" in claims
    assert "pro success >= 99%" in claims
    table = markdown_table([powered])
    assert "J / full-quality image" in table
    assert f"| {powered.joules_per_work:.0f} |" in table


def test_the_bench_compresses_the_power_policy_only_when_it_runs_the_strategy(
        tmp_path: Path) -> None:
    def config(strategies: tuple[str, ...], power_policy: Path = POWER_POLICY) -> BenchConfig:
        return BenchConfig(scenario=SCENARIO, strategies=strategies, loads=(1.0,), speed=40.0,
                           policy_path=BENCH_POLICY, out=tmp_path / "-".join(strategies),
                           power_policy_path=power_policy)

    assert prepare(config(("meltguard",))).power_policy is None
    prepared = prepare(config(("meltguard", POWER_STRATEGY)))
    assert prepared.power_policy is not None
    compressed = load_policy_file(prepared.power_policy).policy
    assert compressed.power == load_policy_file(POWER_POLICY).policy.power
    assert compressed.pressure.levels["elevated"].min_dwell == pytest.approx(3.0 / 40.0)
    with pytest.raises(ValueError, match="needs a policy with a `power` section"):
        prepare(config((POWER_STRATEGY,), power_policy=BENCH_POLICY))
