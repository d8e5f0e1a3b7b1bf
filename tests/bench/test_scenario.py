"""The benchmark's scenario: capacity from the simulator's parameters, reproducible arrivals,
the request log format, the policy's time compression, and the bench policy itself."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path

import pytest

from meltguard.admission.policy import Level
from meltguard.bench.outcome import RequestRecord, TelemetryPoint, percentile, summarize
from meltguard.bench.progress import Progress
from meltguard.bench.report import evaluate, markdown_table, queue_wait_bound
from meltguard.bench.scenario import (
    Arrival,
    RequestLogError,
    Scenario,
    arrivals,
    capacity,
    compress_policy,
    format_requests,
    parse_requests,
    tenant_key,
    tenant_name,
)
from meltguard.daemon.policy_file import load_policy_file, load_policy_text
from meltguard.daemon.telemetry.simulated import steady_state_temperature
from meltguard.values import Size

ROOT = Path(__file__).resolve().parents[2]
BENCH_POLICY = ROOT / "policies" / "bench.yaml"


def test_capacity_is_where_the_card_settles_at_slowdown() -> None:
    scenario = Scenario()
    cap = capacity(scenario)
    # 512x512 at 30 steps: 0.05 s + 0.2 s/MP/step x 0.262 MP x 30 steps.
    assert cap.service_s == pytest.approx(0.05 + 0.2 * 0.262144 * 30)
    assert cap.duty == pytest.approx(0.794, abs=0.001)
    assert steady_state_temperature(scenario.gpu, cap.duty) == pytest.approx(87.0)
    assert cap.sustainable_ips == pytest.approx(cap.duty / cap.service_s)
    assert cap.nominal_rps > cap.sustainable_rps
    assert "sustainable capacity" in cap.describe()


def test_arrivals_are_reproducible_and_follow_the_mix() -> None:
    scenario = Scenario()
    cap = capacity(scenario)
    once, again = arrivals(scenario, 5.0, cap), arrivals(scenario, 5, cap)
    assert once == again  # 5 and 5.0 are one load point
    assert arrivals(scenario, 2.0, cap) != once
    assert all(0 < a.t < scenario.end_s for a in once)
    rate = len(once) / scenario.end_s
    assert rate == pytest.approx(5.0 * cap.sustainable_rps, rel=0.1)
    shares = {t.tier: sum(1 for a in once if a.tier == t.tier) / len(once)
              for t in scenario.tiers}
    assert shares == pytest.approx({"free": 0.7, "plus": 0.2, "pro": 0.1}, abs=0.04)
    assert len({a.tenant for a in once if a.tier == "free"}) > 30  # many tenants per tier


def test_every_bench_tenant_has_a_key_in_the_bench_policy() -> None:
    policy = load_policy_file(BENCH_POLICY).policy
    keys = {(k.tenant, k.tier, k.key_sha256) for k in policy.api_keys}
    for load in Scenario().tiers:
        for index in range(load.tenants):
            tenant = tenant_name(load.tier, index)
            digest = hashlib.sha256(tenant_key(tenant).encode()).hexdigest()
            assert (tenant, load.tier, digest) in keys


def test_request_log_round_trip_and_errors() -> None:
    items = (Arrival(0.5, "pro", "pro-001", Size(512, 512), 30, 1),
             Arrival(1.25, "free", "free-007", None, None, 2))
    assert parse_requests(format_requests(items)) == items
    text = '# a comment\n\n{"t": 3, "tier": "plus"}\n'
    assert parse_requests(text) == (Arrival(3.0, "plus", "plus-000"),)
    bad = {
        '{"t": -1, "tier": "pro"}': "log:1: t:",
        '{"t": 1}': "log:1: tier:",
        '{"t": 1, "tier": "pro", "colour": "red"}': "log:1: colour: unknown field",
        '{"t": 1, "tier": "pro", "size": "big"}': "log:1: size:",
        '{"t": 1, "tier": "pro", "steps": 0}': "log:1: steps:",
        '[1, 2]': "log:1: each line must be a JSON object",
        '{"t": 2, "tier": "pro"}\n{"t": 1, "tier": "pro"}': "log:2: t goes backwards",
        "{oops": "log:1: not JSON",
    }
    for line, message in bad.items():
        with pytest.raises(RequestLogError, match=message):
            parse_requests(line, "log")


def test_compression_divides_every_duration_and_keeps_the_policy_valid() -> None:
    loaded = load_policy_file(BENCH_POLICY)
    fast = load_policy_text(compress_policy(loaded.text, 40.0)).policy
    slow = loaded.policy
    for tier in slow.tiers:
        for level in Level:
            assert fast.effective(tier, level).max_queue_wait == pytest.approx(
                slow.effective(tier, level).max_queue_wait / 40)
        for a, b in zip(fast.tiers[tier].quotas, slow.tiers[tier].quotas, strict=True):
            assert (a.per, a.limit) == (pytest.approx(b.per / 40), b.limit)
    assert fast.pressure.sample_interval == pytest.approx(slow.pressure.sample_interval / 40)
    assert fast.pressure.stale_after == pytest.approx(slow.pressure.stale_after / 40)
    for name, level in slow.pressure.levels.items():
        assert fast.pressure.levels[name].min_dwell == pytest.approx(level.min_dwell / 40)
        assert fast.pressure.levels[name].enter == level.enter  # temperatures stay
    assert fast.api_keys == slow.api_keys


def test_summary_figures() -> None:
    scenario = dataclasses.replace(Scenario(), warmup_s=10.0, duration_s=100.0)
    records = [
        RequestRecord(5.0, "pro", 200, "ok", 1.0, images=1, work=1.0),  # warm-up: not counted
        RequestRecord(20.0, "pro", 200, "ok", 2.0, degraded=True, images=1, work=0.5),
        RequestRecord(30.0, "pro", 200, "ok", 500.0, images=1, work=1.0),  # late
        RequestRecord(40.0, "free", 503, "server_overloaded", 0.1),
        RequestRecord(50.0, "plus", 0, "unanswered", 200.0),
    ]
    telemetry = [TelemetryPoint(0.0, 80.0, False, 0), TelemetryPoint(10.0, 87.0, True, 3),
                 TelemetryPoint(15.0, 85.0, False, 3), TelemetryPoint(20.0, 84.0, False, 2)]
    result = summarize(strategy="x", load=1.0, scenario=scenario, capacity_ips=0.5,
                       requests=records, telemetry=telemetry)
    assert result.good_images == 1 and result.goodput_ratio == pytest.approx(0.02)
    assert result.work_ratio == pytest.approx(0.01)
    assert result.refused == {"server_overloaded": 1}
    assert (result.throttled_s, result.above_slowdown_s, result.peak_c) == (5.0, 5.0, 87.0)
    pro = result.tier("pro")
    assert pro is not None
    assert (pro.offered, pro.succeeded, pro.degraded, pro.late) == (2, 1, 1, 1)
    assert result.p99_s == 500.0  # admitted: answered and unanswered, lateness included
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([], 99) is None
    assert "| x | 1x |" in markdown_table([result])


def test_targets_are_checked_against_the_policy() -> None:
    policy = load_policy_file(BENCH_POLICY).policy
    scenario = dataclasses.replace(Scenario(), warmup_s=0.0, duration_s=10.0)
    cap = capacity(scenario)
    bound = queue_wait_bound(policy, "pro") + 2 * cap.service_s
    records = [RequestRecord(float(i), "pro", 200, "ok", bound + 1.0, images=1, work=1.0)
               for i in range(10)]
    result = summarize(strategy="meltguard", load=5.0, scenario=scenario,
                       capacity_ips=cap.sustainable_ips, requests=records,
                       telemetry=[TelemetryPoint(0, 80, False, 0),
                                  TelemetryPoint(9, 86, False, 3)])
    verdicts = {" ".join(v.claim.split(" ")[:2]): v for v in evaluate([result], policy, cap)}
    assert verdicts["full-quality work"].met  # 10 images in 10 s is twice the capacity
    assert verdicts["peak <"].met
    assert verdicts["pro success"].met
    assert verdicts["pro p99"].met is False
    assert "NOT MET" in verdicts["pro p99"].line()


def test_progress_bar_draws_on_a_terminal_and_logs_lines_elsewhere() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        progress = Progress(2, point_s=10.0, stream=stream)
        progress.start("meltguard @ 5x")
        progress.advance(0.5)
        progress.done("goodput 1.2x")
        progress.close()
    assert "[" + "#" * 15 + "-" * 15 + "] 1/2 meltguard @ 5x" in terminal.getvalue()
    assert log.getvalue() == "[1/2] meltguard @ 5x: goodput 1.2x\n"
