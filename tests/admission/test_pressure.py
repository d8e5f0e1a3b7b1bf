"""Pressure levels on a fake time axis: every `now` is passed in, nothing sleeps."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meltguard.admission.policy import Level, Policy, parse_policy
from meltguard.admission.pressure import (
    NOT_COOLING_ETA_S,
    GpuPressure,
    PressureState,
    assess,
    cooling_eta,
)
from meltguard.values import GpuSample

BASE: dict[str, Any] = {
    "version": 1,
    "tiers": {"free": {"priority": 0}},
    "pressure": {
        "sample_interval": "500ms",
        "stale_after": "5s",
        "on_stale": "high",
        "levels": {
            "elevated": {
                "enter": {"temperature_c": 78, "memory_ratio": 0.85, "utilization": 0.99,
                          "power_ratio": 0.95},
                "exit": {"temperature_c": 74, "memory_ratio": 0.80, "power_ratio": 0.85},
                "min_dwell": "10s",
            },
            "high": {
                "enter": {"below_slowdown_c": 5, "memory_ratio": 0.92,
                          "throttle": ["sw_thermal", "hw_thermal"]},
                "exit": {"below_slowdown_c": 8, "memory_ratio": 0.88},
                "min_dwell": "15s",
            },
            "critical": {
                "enter": {"temperature_c": 90, "memory_ratio": 0.97, "gpu_lost": True},
                "exit": {"temperature_c": 86, "memory_ratio": 0.93},
                "min_dwell": "30s",
            },
        },
    },
}
POLICY = parse_policy(BASE)


def policy_with(**pressure: Any) -> Policy:
    data = copy.deepcopy(BASE)
    data["pressure"].update(pressure)
    return parse_policy(data)


LOOKAHEAD = policy_with(lookahead="30s")


def gpu(
    t: float,
    temp: float | None = None,
    *,
    index: int = 0,
    slowdown: float | None = None,
    mem: float | None = None,
    util: float | None = None,
    power: float | None = None,
    throttle: Iterable[str] = (),
    lost: bool = False,
) -> GpuSample:
    return GpuSample(
        index=index,
        uuid=f"GPU-{index}",
        name="Fake H100",
        taken_at=t,
        temperature_c=temp,
        slowdown_c=slowdown,
        memory_used_bytes=None if mem is None else round(mem * 80_000),
        memory_total_bytes=None if mem is None else 80_000,
        utilization=util,
        power_w=None if power is None else power * 700,
        power_limit_w=None if power is None else 700.0,
        throttle=frozenset(throttle),
        lost=lost,
    )


def run(
    steps: Sequence[tuple[float, Sequence[GpuSample]]],
    policy: Policy = POLICY,
    state: PressureState | None = None,
) -> list[PressureState]:
    """Assess each (now, samples) in turn, threading the state through."""
    states = []
    for now, samples in steps:
        state = assess(samples, state, policy, now)
        states.append(state)
    return states


def fresh(now: float, temp: float | None = None, **fields: Any) -> tuple[float, list[GpuSample]]:
    """One step whose single sample was taken at `now`."""
    return now, [gpu(now, temp, **fields)]


def levels(states: Iterable[PressureState]) -> list[Level]:
    return [s.level for s in states]


# --- entering -------------------------------------------------------------------------------


def test_cool_gpu_is_normal() -> None:
    (state,) = run([fresh(0, 60, mem=0.5, util=0.9, power=0.5, slowdown=90)])
    assert state.level == Level.NORMAL
    assert not state.stale
    assert state.reasons == ()
    assert state.gpus[0].signals == ()


@pytest.mark.parametrize(
    ("fields", "level", "signal"),
    [
        ({"temp": 78}, Level.ELEVATED, "temperature_c>=78"),
        ({"mem": 0.85}, Level.ELEVATED, "memory_ratio>=0.85"),
        ({"util": 0.99}, Level.ELEVATED, "utilization>=0.99"),
        ({"power": 0.95}, Level.ELEVATED, "power_ratio>=0.95"),
        ({"temp": 85, "slowdown": 90}, Level.HIGH, "below_slowdown_c<=5"),
        ({"mem": 0.92}, Level.HIGH, "memory_ratio>=0.92"),
        ({"throttle": ["hw_thermal", "sw_power_cap"]}, Level.HIGH, "throttle:hw_thermal"),
        ({"temp": 90}, Level.CRITICAL, "temperature_c>=90"),
        ({"mem": 0.97}, Level.CRITICAL, "memory_ratio>=0.97"),
        ({"lost": True}, Level.CRITICAL, "gpu_lost"),
    ],
)
def test_each_signal_enters_its_level_at_once(
    fields: dict[str, Any], level: Level, signal: str
) -> None:
    temp = fields.pop("temp", None)
    (state,) = run([fresh(100, temp, **fields)])
    assert state.level == level
    assert state.entered_at == 100
    assert signal in state.gpus[0].signals
    assert f"gpu0:{signal}" in state.reasons


def test_throttle_reason_not_listed_does_not_enter() -> None:
    (state,) = run([fresh(0, 60, throttle=["sw_power_cap", "gpu_idle"])])
    assert state.level == Level.NORMAL


def test_highest_entered_level_wins() -> None:
    (state,) = run([fresh(0, 92, mem=0.86)])
    assert state.level == Level.CRITICAL
    assert state.gpus[0].signals[0] == "temperature_c>=90"


def test_escalation_is_immediate_even_within_dwell() -> None:
    states = run([fresh(0, 80), fresh(1, 91)])
    assert levels(states) == [Level.ELEVATED, Level.CRITICAL]
    assert states[1].entered_at == 1


def test_below_slowdown_is_relative_to_the_cards_own_slowdown() -> None:
    (hot_card,) = run([fresh(0, 86, slowdown=90)])
    (roomy_card,) = run([fresh(0, 86, slowdown=100)])
    (silent_card,) = run([fresh(0, 86)])
    assert hot_card.level == Level.HIGH
    assert roomy_card.level == Level.ELEVATED  # 86 >= 78, but 14 °C of headroom
    assert silent_card.level == Level.ELEVATED  # no slowdown reported: signal ignored


# --- leaving --------------------------------------------------------------------------------


def test_hysteresis_band_holds_the_level() -> None:
    states = run([fresh(0, 80), fresh(20, 76), fresh(40, 74.5), fresh(41, 74)])
    assert levels(states) == [Level.ELEVATED] * 3 + [Level.NORMAL]
    assert states[1].gpus[0].signals == ("temperature_c>74",)
    assert states[3].entered_at == 41


def test_min_dwell_prevents_leaving_early() -> None:
    states = run([fresh(0, 80), fresh(1, 60), fresh(9.9, 60), fresh(10, 60)])
    assert levels(states) == [Level.ELEVATED] * 3 + [Level.NORMAL]
    assert states[1].gpus[0].signals == ("min_dwell",)
    assert states[2].entered_at == 0


def test_every_exit_signal_must_hold() -> None:
    states = run([fresh(0, 80, mem=0.86), fresh(20, 60, mem=0.82), fresh(21, 60, mem=0.8)])
    assert levels(states) == [Level.ELEVATED, Level.ELEVATED, Level.NORMAL]
    assert states[1].gpus[0].signals == ("memory_ratio>0.8",)


def test_enter_signal_without_exit_counterpart_leaves_when_it_stops_holding() -> None:
    # utilization and throttle have no exit thresholds: they leave once they stop holding.
    states = run([
        fresh(0, util=1.0),
        fresh(20, util=0.98),
        fresh(21, 60, throttle=["sw_thermal"]),
        fresh(36, 60),
    ])
    assert levels(states) == [Level.ELEVATED, Level.NORMAL, Level.HIGH, Level.NORMAL]


def test_leaving_lands_on_the_highest_level_still_entered() -> None:
    states = run([fresh(0, 91), fresh(30, 80), fresh(35, 60), fresh(40, 60)])
    assert levels(states) == [Level.CRITICAL, Level.ELEVATED, Level.ELEVATED, Level.NORMAL]
    # Landing on elevated restarts its dwell: entered at 30, so not left before 40.
    assert states[1].entered_at == 30


def test_leaving_lands_inside_a_lower_hysteresis_band() -> None:
    # 84 °C is below high's enter line (85) but above its exit line (82): still high.
    timeline = [(0, 91), (30, 84), (44, 70), (45, 70)]
    states = run([fresh(t, temp, slowdown=90) for t, temp in timeline])
    assert levels(states) == [Level.CRITICAL, Level.HIGH, Level.HIGH, Level.NORMAL]
    assert states[1].gpus[0].signals == ("below_slowdown_c<8",)
    assert states[1].entered_at == 30


def test_levels_jumped_over_keep_their_own_dwell() -> None:
    data = copy.deepcopy(BASE)
    data["pressure"]["levels"]["elevated"]["min_dwell"] = "20s"
    data["pressure"]["levels"]["high"]["min_dwell"] = "5s"
    policy = parse_policy(data)
    states = run([fresh(0, 60, throttle=["sw_thermal"]), fresh(5, 60), fresh(19, 60),
                  fresh(20, 60)], policy)
    # Straight to high at 0; high may go at 5 but elevated was entered at 0 too, so it holds
    # until 20: no level is ever left sooner than its min_dwell after entering it.
    assert levels(states) == [Level.HIGH, Level.ELEVATED, Level.ELEVATED, Level.NORMAL]


def test_unknown_readings_never_block_exit() -> None:
    states = run([fresh(0, 80, mem=0.9), fresh(10, None), fresh(11, 60)])
    assert levels(states) == [Level.ELEVATED, Level.NORMAL, Level.NORMAL]


def test_unknown_readings_never_trigger() -> None:
    (state,) = run([fresh(0)])
    assert state.level == Level.NORMAL


# --- lost and stale -------------------------------------------------------------------------


def test_lost_gpu_is_critical_whatever_the_policy_says() -> None:
    bare = parse_policy({"version": 1, "tiers": {"free": {"priority": 0}}})
    states = run([fresh(0, lost=True), fresh(1, 50)], bare)
    assert states[0].level == Level.CRITICAL
    assert states[0].reasons == ("gpu0:gpu_lost",)
    assert states[1].level == Level.NORMAL  # no level config: no dwell to wait out


def test_lost_gpu_stays_critical_while_lost() -> None:
    states = run([fresh(t, lost=True) for t in (0, 31, 100)])
    assert levels(states) == [Level.CRITICAL] * 3


def test_stale_samples_mean_on_stale() -> None:
    (state,) = run([(10, [gpu(4.9, 50)])])
    assert state.level == Level.HIGH
    assert state.stale
    assert state.reasons == ("gpu0:telemetry_stale",)
    assert state.gpus[0].temperature_c is None  # a stale reading is not evidence


def test_sample_just_inside_stale_after_is_fresh() -> None:
    (state,) = run([(10, [gpu(5, 50)])])
    assert state.level == Level.NORMAL
    assert not state.stale


def test_no_samples_at_all_mean_on_stale() -> None:
    (state,) = run([(0, [])])
    assert (state.level, state.stale, state.reasons, state.gpus) == (
        Level.HIGH, True, ("telemetry_missing",), ()
    )


def test_a_gpu_that_stops_reporting_is_missing() -> None:
    states = run([(0, [gpu(0, 50, index=0), gpu(0, 50, index=1)]), (1, [gpu(1, 50, index=0)])])
    assert states[1].level == Level.HIGH
    assert states[1].reasons == ("gpu1:telemetry_missing",)
    assert [g.index for g in states[1].gpus] == [0, 1]


def test_on_stale_follows_the_policy() -> None:
    (state,) = run([(0, [])], policy_with(on_stale="critical"))
    assert state.level == Level.CRITICAL


def test_recovering_from_stale_follows_exit_rules() -> None:
    states = run([(10, [gpu(0, 50)]), fresh(11, 50), fresh(24.9, 50), fresh(25, 50)])
    assert levels(states) == [Level.HIGH] * 3 + [Level.NORMAL]
    assert states[1].gpus[0].signals == ("min_dwell",)


def test_recovering_from_no_telemetry_at_start_follows_exit_rules() -> None:
    states = run([(0, []), fresh(1, 50), fresh(15, 50)])
    assert levels(states) == [Level.HIGH, Level.HIGH, Level.NORMAL]


def test_stale_telemetry_does_not_cut_a_dwell_short() -> None:
    states = run([fresh(0, 95), (10, [gpu(0, 95)]), (30, [gpu(0, 95)])])
    # Critical holds for its dwell even though nothing is known; then on_stale takes over.
    assert levels(states) == [Level.CRITICAL, Level.CRITICAL, Level.HIGH]
    assert states[2].reasons == ("gpu0:telemetry_stale",)


def test_newest_sample_per_gpu_wins() -> None:
    (state,) = run([(10, [gpu(9, 60), gpu(10, 91), gpu(8, 60)])])
    assert state.level == Level.CRITICAL


# --- lookahead ------------------------------------------------------------------------------
# lookahead asks the card's fitted thermal model (admission/thermal.py), not a straight line:
# the curves below are what a heatsink does, settling exponentially.


def curve(
    start: float, settle: float, tau: float, times: Iterable[float], *, util: float = 0.9,
    **fields: Any,
) -> list[tuple[float, list[GpuSample]]]:
    """One sample per time on a first-order curve from `start` toward `settle`."""
    return [fresh(t, settle + (start - settle) * math.exp(-t / tau), util=util, **fields)
            for t in times]


HALF_SECONDS = [i * 0.5 for i in range(400)]


def first(states: Sequence[PressureState], level: Level) -> int | None:
    return next((i for i, s in enumerate(states) if s.level >= level), None)


def test_lookahead_enters_before_a_curve_that_will_cross() -> None:
    # From 60 toward 85 with τ = 60 s: 78 is crossed at t = 60·ln(25/7) = 76.4 s; with a
    # 30 s lookahead the model enters about 30 s before that.
    steps = curve(60, 85, 60, HALF_SECONDS)
    states = run(steps, LOOKAHEAD)
    at = first(states, Level.ELEVATED)
    assert at is not None
    entered_t = steps[at][0]
    assert 44.0 <= entered_t <= 50.0
    assert states[at].gpus[0].signals == ("lookahead:temperature_c>=78",)
    assert states[at].reasons == ("gpu0:lookahead:temperature_c>=78",)
    fit = states[at].gpus[0].thermal
    assert fit is not None and fit.settle_c() == pytest.approx(85, abs=1.0)


def test_lookahead_follows_a_time_compressed_sample_interval() -> None:
    # The same curve 40x faster, sampled 40x more often (a --sim-speed 40 daemon): the model
    # counts in sample intervals, so lookahead enters at the same sample.
    compressed = policy_with(lookahead="750ms", sample_interval="12.5ms")
    plain = run(curve(60, 85, 60, HALF_SECONDS), LOOKAHEAD)
    fast = run(curve(60, 85, 1.5, [t / 40 for t in HALF_SECONDS]), compressed)
    assert first(fast, Level.ELEVATED) == first(plain, Level.ELEVATED) is not None


def test_lookahead_reaches_below_slowdown_lines() -> None:
    # Slowdown 90, so high enters at 85; the curve settles at 95.
    states = run(curve(70, 95, 60, HALF_SECONDS, slowdown=90), LOOKAHEAD)
    at = first(states, Level.HIGH)
    assert at is not None
    assert "lookahead:below_slowdown_c<=5" in states[at].gpus[0].signals
    assert states[at].gpus[0].temperature_c is not None
    assert states[at].gpus[0].temperature_c < 85


def test_lookahead_ignores_a_flat_curve() -> None:
    states = run(curve(77, 77, 60, HALF_SECONDS), LOOKAHEAD)
    assert set(levels(states)) == {Level.NORMAL}


def test_lookahead_ignores_a_falling_curve() -> None:
    states = run(curve(77, 50, 60, HALF_SECONDS), LOOKAHEAD)
    assert set(levels(states)) == {Level.NORMAL}


def test_lookahead_ignores_a_steep_start_that_flattens_below() -> None:
    # The first seconds of a load step climb 2 °C/s, which a straight line projects past 90;
    # the curve settles at 70 and nothing is entered.
    idle = [fresh(t, 42.0, util=0.0) for t in HALF_SECONDS[:60]]
    step = [fresh(30 + t, 70 - 28 * math.exp(-t / 14), util=0.9) for t in HALF_SECONDS]
    states = run(idle + step, LOOKAHEAD)
    assert set(levels(states)) == {Level.NORMAL}


def test_lookahead_waits_for_a_fit() -> None:
    # A 1 °C jump between two samples is NVML rounding, not a curve: nothing is predicted
    # before the model has seen MIN_FIT_SAMPLES steps.
    states = run([fresh(0, 70), fresh(1, 71), fresh(2, 72)], LOOKAHEAD)
    assert set(levels(states)) == {Level.NORMAL}
    thermal = states[-1].gpus[0].thermal
    assert thermal is not None and thermal.trusted is None


def test_lookahead_is_off_unless_configured() -> None:
    states = run(curve(60, 85, 60, HALF_SECONDS))
    assert first(states, Level.ELEVATED) == next(
        i for i, (_, samples) in enumerate(curve(60, 85, 60, HALF_SECONDS))
        if (samples[0].temperature_c or 0) >= 78)


def test_the_same_sample_twice_is_fitted_once() -> None:
    state = None
    for t in range(100):
        state = assess([gpu(t * 0.5, 60)], state, LOOKAHEAD, t * 0.5)
        state = assess([gpu(t * 0.5, 60)], state, LOOKAHEAD, t * 0.5 + 0.1)
    assert state is not None
    thermal = state.gpus[0].thermal
    assert thermal is not None and thermal.steps == 99


# --- several GPUs ---------------------------------------------------------------------------


def test_overall_level_is_the_hottest_gpu() -> None:
    (state,) = run([(0, [gpu(0, 60, index=0), gpu(0, 80, index=1), gpu(0, 50, index=2)])])
    assert state.level == Level.ELEVATED
    assert [g.level for g in state.gpus] == [Level.NORMAL, Level.ELEVATED, Level.NORMAL]
    assert state.reasons == ("gpu1:temperature_c>=78",)


def test_overall_entered_at_survives_a_handover_between_gpus() -> None:
    states = run([
        (0, [gpu(0, 80, index=0), gpu(0, 60, index=1)]),
        (5, [gpu(5, 76, index=0), gpu(5, 80, index=1)]),
        (30, [gpu(30, 60, index=0), gpu(30, 76, index=1)]),
    ])
    assert levels(states) == [Level.ELEVATED] * 3
    assert [s.entered_at for s in states] == [0, 0, 0]
    assert states[2].reasons == ("gpu1:temperature_c>74",)


def test_state_lookup_by_gpu_index() -> None:
    (state,) = run([(0, [gpu(0, 60, index=3)])])
    assert isinstance(state.gpu(3), GpuPressure)
    assert state.gpu(0) is None


# --- cooling_eta ----------------------------------------------------------------------------


def test_cooling_eta_is_zero_at_normal() -> None:
    (state,) = run([fresh(0, 50)])
    assert cooling_eta(state, POLICY, 0) == 0.0


def test_cooling_eta_is_the_remaining_dwell_once_below_exit() -> None:
    states = run([fresh(0, 80), fresh(4, 60)])
    assert cooling_eta(states[-1], POLICY, 4) == pytest.approx(6.0)


def test_cooling_eta_follows_the_fitted_cooling_curve() -> None:
    # Cooling from 85 toward 50 with τ = 40 s, idle: elevated holds until 74, which the curve
    # reaches at t = 40·ln(35/24) = 15.1 s; at t = 12 about 3.1 s remain.
    steps = curve(85, 50, 40, [i * 0.5 for i in range(25)], util=0.0)
    states = run(steps, POLICY)
    assert states[-1].level == Level.ELEVATED
    assert cooling_eta(states[-1], POLICY, 12) == pytest.approx(40 * math.log(35 / 24) - 12,
                                                                 abs=0.5)


def test_cooling_eta_never_below_remaining_dwell() -> None:
    # Past the exit line within 3 s, but elevated was entered at 0: 7 s of dwell are left.
    steps = curve(80, 40, 10, [i * 0.5 for i in range(7)], util=0.0)
    states = run(steps, POLICY)
    last = states[-1]
    assert last.level == Level.ELEVATED
    assert cooling_eta(last, POLICY, 3) == pytest.approx(7.0)


def test_cooling_eta_without_a_fit_yet_is_conservative() -> None:
    (state,) = run([fresh(0, 80)])
    assert cooling_eta(state, POLICY, 0) == NOT_COOLING_ETA_S


def test_cooling_eta_when_not_cooling_is_conservative() -> None:
    states = run(curve(80, 80, 40, HALF_SECONDS[:80]))
    assert states[-1].level == Level.ELEVATED
    assert cooling_eta(states[-1], POLICY, 39.5) == NOT_COOLING_ETA_S


def test_cooling_eta_assumes_shed_load_when_the_present_one_keeps_it_hot() -> None:
    # Idle at 45 (the lightest load seen), then loaded toward 90. At the load it has now it
    # would never cool below 74; shedding brings it back toward 45 along the fitted curve.
    idle = [fresh(t, 45 + 0.0 * t, util=0.0) for t in HALF_SECONDS[:40]]
    hot = [fresh(20 + t, 90 - 45 * math.exp(-t / 40), util=0.9) for t in HALF_SECONDS[:200]]
    states = run(idle + hot, POLICY)
    last = states[-1]
    assert last.level >= Level.ELEVATED
    eta = cooling_eta(last, POLICY, idle[-1][0] + hot[-1][0])
    assert 0 < eta < NOT_COOLING_ETA_S


def test_cooling_eta_for_memory_pressure_is_conservative() -> None:
    states = run([fresh(t, 50, mem=0.9) for t in range(40)])
    assert cooling_eta(states[-1], POLICY, 39) == NOT_COOLING_ETA_S


def test_cooling_eta_while_stale_is_conservative() -> None:
    (state,) = run([(0, [])])
    assert cooling_eta(state, POLICY, 0) == NOT_COOLING_ETA_S


def test_cooling_eta_below_slowdown_uses_the_cards_line() -> None:
    # High holds until 8 °C under this card's slowdown of 90, i.e. 82. Cooling from 87.5
    # toward 60 with τ = 100 s: 82 is reached at t = 100·ln(27.5/22) = 22.3 s.
    steps = curve(87.5, 60, 100, [i * 0.5 for i in range(21)], util=0.0, slowdown=90)
    states = run(steps, POLICY)
    assert states[-1].level == Level.HIGH
    assert cooling_eta(states[-1], POLICY, 10) == pytest.approx(
        100 * math.log(27.5 / 22) - 10, abs=0.5)


def test_cooling_eta_waits_for_the_slowest_gpu() -> None:
    times = [i * 0.5 for i in range(21)]
    states = run([(t, [gpu(t, 50 + 35 * math.exp(-t / 40), index=0, util=0.0),
                       gpu(t, 50 + 38 * math.exp(-t / 40), index=1, util=0.0)])
                  for t in times])
    # At t = 10 both are elevated; gpu1 is hotter and needs 40·ln(38/24) - 10 s to reach 74.
    assert cooling_eta(states[-1], POLICY, 10) == pytest.approx(
        40 * math.log(38 / 24) - 10, abs=0.5)


# --- properties -----------------------------------------------------------------------------

DWELLS = st.integers(min_value=0, max_value=40)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Policy, list[tuple[float, list[GpuSample]]]]:
    """A policy with random dwells (not necessarily increasing) and a random GPU history."""
    data = copy.deepcopy(BASE)
    for name in ("elevated", "high", "critical"):
        data["pressure"]["levels"][name]["min_dwell"] = draw(DWELLS)
    data["pressure"]["lookahead"] = draw(st.sampled_from([None, "10s", "30s"]))
    policy = parse_policy(data)
    slowdown = draw(st.sampled_from([None, 88.0, 95.0]))
    steps = []
    now = 0.0
    for _ in range(draw(st.integers(min_value=1, max_value=60))):
        now += draw(st.integers(min_value=1, max_value=80)) * 0.25  # exact in binary
        lag = draw(st.sampled_from([0.0, 0.0, 0.0, 0.0, 0.5, 6.0]))  # sometimes stale
        temp = draw(st.one_of(st.none(), st.integers(min_value=400, max_value=1000).map(
            lambda d: d / 10)))
        mem = draw(st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0)))
        samples = [] if draw(st.integers(0, 19)) == 0 else [
            gpu(now - lag, temp, slowdown=slowdown, mem=mem)
        ]
        steps.append((now, samples))
    return policy, steps


def entered_by_reading(policy: Policy, samples: Sequence[GpuSample], now: float) -> Level:
    """An independent oracle: the highest level whose enter signals hold for this reading."""
    if not samples or samples[0].taken_at < now - policy.pressure.stale_after:
        return Level.named(policy.pressure.on_stale)
    sample = samples[0]
    found = Level.NORMAL
    for level in (Level.ELEVATED, Level.HIGH, Level.CRITICAL):
        config = policy.level_config(level)
        assert config is not None
        enter = config.enter
        holds = (
            (enter.temperature_c is not None and sample.temperature_c is not None
             and sample.temperature_c >= enter.temperature_c)
            or (enter.memory_ratio is not None and sample.memory_ratio is not None
                and sample.memory_ratio >= enter.memory_ratio)
            or (enter.below_slowdown_c is not None and sample.temperature_c is not None
                and sample.slowdown_c is not None
                and sample.temperature_c >= sample.slowdown_c - enter.below_slowdown_c)
        )
        if holds:
            found = level
    return found


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_level_never_drops_within_min_dwell_of_entering(
    scenario: tuple[Policy, list[tuple[float, list[GpuSample]]]],
) -> None:
    policy, steps = scenario
    crossed: dict[Level, float] = {}
    before = Level.NORMAL
    state: PressureState | None = None
    for now, samples in steps:
        state = assess(samples, state, policy, now)
        for level in (Level.ELEVATED, Level.HIGH, Level.CRITICAL):
            config = policy.level_config(level)
            assert config is not None
            if before < level <= state.level:
                crossed[level] = now
            if state.level < level <= before:
                assert now - crossed[level] >= config.min_dwell, (level, crossed, now)
        before = state.level


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_level_is_at_least_what_the_reading_enters(
    scenario: tuple[Policy, list[tuple[float, list[GpuSample]]]],
) -> None:
    policy, steps = scenario
    state: PressureState | None = None
    for now, samples in steps:
        state = assess(samples, state, policy, now)
        assert state.level >= entered_by_reading(policy, samples, now)
        assert state.level == max((g.level for g in state.gpus), default=state.level)
        # A level above normal always has a reason to wait: a dwell, a trend, or the default.
        eta = cooling_eta(state, policy, now)
        assert (eta == 0.0) == (state.level == Level.NORMAL)
        assert math.isfinite(eta)
