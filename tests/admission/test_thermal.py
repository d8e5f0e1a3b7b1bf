"""The thermal model (admission/thermal.py) and the synthetic cards the issue names, through
the shipped incident policy. Time is an argument: every curve is computed, nothing sleeps."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest

from meltguard.admission.policy import Hold, Level, Policy
from meltguard.admission.pressure import PressureState, assess, cooling_eta
from meltguard.admission.thermal import MIN_FIT_SAMPLES, ThermalFit, ThermalState
from meltguard.daemon.policy_file import load_policy_file
from meltguard.values import GpuSample

ROOT = Path(__file__).resolve().parents[2]
INCIDENT = load_policy_file(ROOT / "policies" / "examples" / "incident.yaml").policy


def sample(t: float, temp: float, *, power: float | None = None, util: float | None = None,
           slowdown: float | None = None) -> GpuSample:
    return GpuSample(index=0, uuid="GPU-0", name="Synthetic", taken_at=t, temperature_c=temp,
                     utilization=util, power_w=power, power_limit_w=700.0 if power else None,
                     slowdown_c=slowdown)


class TwoStageCard:
    """A card with a die and a heatsink: T = H + R_f·x at once, H first order toward
    T_amb + R_s·x with time constant tau; x is power over the 700 W limit."""

    def __init__(self, ambient: float = 30.0, r_fast: float = 12.0, r_slow: float = 50.0,
                 tau: float = 60.0, load: float = 0.1) -> None:
        self.ambient, self.r_fast, self.r_slow, self.tau = ambient, r_fast, r_slow, tau
        self.load = load
        self.heatsink = ambient + r_slow * load

    def step(self, dt: float) -> None:
        target = self.ambient + self.r_slow * self.load
        self.heatsink = target + (self.heatsink - target) * math.exp(-dt / self.tau)

    @property
    def temperature(self) -> float:
        return self.heatsink + self.r_fast * self.load


def replay(card: TwoStageCard, loads: list[tuple[float, float]], interval: float = 0.5,
           *, rounding: bool = False, seed: int = 0) -> list[GpuSample]:
    """Samples of `card` under a load schedule [(until_t, load)], every `interval` s."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for until, load in loads:
        while t < until:
            card.load = load
            card.step(interval)
            t += interval
            temp = card.temperature
            if rounding:
                temp = float(round(temp + rng.uniform(-0.3, 0.3)))
            out.append(sample(t, temp, power=load * 700, util=min(load / 0.9, 1.0)))
    return out


def fit_of(samples: list[GpuSample], interval: float = 0.5) -> ThermalState:
    state = ThermalState.start(interval, samples[0])
    for s in samples:
        state = state.observe(s)
    return state


def run(samples: list[GpuSample], policy: Policy = INCIDENT) -> list[PressureState]:
    states: list[PressureState] = []
    state = None
    for s in samples:
        state = assess([s], state, policy, s.taken_at)
        states.append(state)
    return states


# --- the model itself ---------------------------------------------------------------------


def test_closed_form_curve_and_crossing_times() -> None:
    fit = ThermalFit(ambient_c=30, r_slow_c=50, r_fast_c=10, tau_s=40, rms_c=0, samples=99)
    assert fit.settle_c(0.5) == 60
    assert fit.predict_c(40, 0.5, 40) == pytest.approx(60 - 20 / math.e)
    assert fit.time_to_c(40, 0.5, 50) == pytest.approx(40 * math.log(2))
    assert fit.time_to_c(40, 0.5, 60) is None  # approached, never reached
    assert fit.time_to_c(40, 0.5, 70) is None  # beyond the settling point
    assert fit.time_to_c(70, 0.5, 65) == pytest.approx(40 * math.log(10 / 5))
    assert fit.time_to_c(50, 0.5, 50) == 0.0
    assert fit.load_for_settle(90) == pytest.approx(1.0)


def test_fit_recovers_a_two_stage_card_from_its_power_steps() -> None:
    card = TwoStageCard()
    samples = replay(card, [(60, 0.1), (240, 0.9), (360, 0.4), (480, 0.8)])
    state = fit_of(samples)
    fit = state.trusted
    assert fit is not None
    assert fit.r_fast_c == pytest.approx(12, abs=1.0)
    assert fit.r_slow_c == pytest.approx(50, abs=3.0)
    assert fit.tau_s == pytest.approx(60, rel=0.3)  # the nearest τ of the grid
    assert state.settle_c() == pytest.approx(30 + 62 * 0.8, abs=1.0)


def test_settling_follows_the_power_at_once() -> None:
    # A fitted card whose load drops: the settling point moves with the power before the
    # temperature has moved at all.
    card = TwoStageCard()
    state = fit_of(replay(card, [(60, 0.1), (240, 0.9), (360, 0.4), (480, 0.8)]))
    card.load = 0.2
    card.step(0.5)
    after = state.observe(sample(480.5, card.temperature, power=0.2 * 700, util=0.2 / 0.9))
    assert after.settle_c() == pytest.approx(30 + 62 * 0.2, abs=1.5)
    assert (after.last_c or 0) > 60  # the card itself is still hot


def test_nothing_is_predicted_for_a_card_that_just_started() -> None:
    card = TwoStageCard()
    samples = replay(card, [(MIN_FIT_SAMPLES * 0.5, 0.9)])
    state = fit_of(samples)
    assert state.trusted is None
    assert state.predict_c(30) is None and state.crossing_in_s(99) is None


def test_utilization_maps_to_load_for_a_power_reporting_card() -> None:
    state = fit_of(replay(TwoStageCard(), [(60, 0.1), (240, 0.9), (360, 0.4)]))
    mapping = state.utilization_to_load()
    assert mapping is not None
    offset, slope = mapping
    assert offset == pytest.approx(0.0, abs=1e-6) and slope == pytest.approx(0.9)


# --- the synthetic cards of the issue, through the shipped incident policy ----------------


def test_a_card_settling_well_below_a_threshold_never_enters_it() -> None:
    # Idle at 37, then a load step that climbs 2 °C/s at first and settles at 68 °C:
    # whole-degree readings with sensor noise, 25 minutes.
    card = TwoStageCard(ambient=30, r_fast=8, r_slow=32, tau=45, load=0.15)
    samples = replay(card, [(30, 0.15), (1500, 0.95)], rounding=True)
    assert max(s.temperature_c or 0 for s in samples) < 70
    states = run(samples)
    assert {s.level for s in states} == {Level.NORMAL}


def test_a_card_wandering_around_an_enter_threshold_changes_level_rarely() -> None:
    # ±2 °C around elevated's 78 for 25 minutes, at the policy's 500 ms.
    rng = random.Random(7)
    samples = []
    for i in range(3000):
        t = i * 0.5
        temp = 78 + 2 * math.sin(2 * math.pi * t / 97) + rng.uniform(-0.5, 0.5)
        samples.append(sample(t, float(round(temp)), util=0.9))
    states = run(samples)
    changes = sum(1 for a, b in itertools.pairwise(states) if a.level != b.level)
    assert changes <= 3


def test_a_card_in_a_cooling_failure_is_critical_by_its_first_sample_at_90() -> None:
    # Running steadily at 74, then the fans fail: heading for 97 °C.
    card = TwoStageCard(ambient=30, r_fast=6, r_slow=44, tau=50, load=0.8)
    samples = replay(card, [(120, 0.8)], rounding=True)
    card.ambient, card.r_slow = 53.0, 47.0  # the heatsink no longer sheds heat to the air
    failing = replay(card, [(300, 0.8)], rounding=True, seed=1)
    failing = [sample(s.taken_at + 120, s.temperature_c or 0, power=560, util=0.89)
               for s in failing]
    states = run(samples + failing)
    hot = next(i for i, s in enumerate(samples + failing) if (s.temperature_c or 0) >= 90)
    entered = next(i for i, s in enumerate(states) if s.level == Level.CRITICAL)
    assert entered <= hot


def test_retry_after_cooling_comes_from_the_fitted_curve() -> None:
    # A card loaded to 85, then shed to idle: while elevated, the cooling estimate is the
    # fitted curve's time to the exit line, which the card then actually takes.
    card = TwoStageCard(ambient=30, r_fast=6, r_slow=54, tau=40, load=0.1)
    samples = replay(card, [(60, 0.1), (300, 0.9), (420, 0.1)])
    states = run(samples)
    at = next(i for i, s in enumerate(samples)
              if s.taken_at > 300 and states[i].level == Level.ELEVATED
              and (s.temperature_c or 0) < 77)
    now = samples[at].taken_at
    eta = cooling_eta(states[at], INCIDENT, now)
    actual = next(s.taken_at for s in samples[at:] if (s.temperature_c or 0) <= 74) - now
    assert eta == pytest.approx(actual, abs=1.5)


# --- holding a card at its edge (pressure.hold) -------------------------------------------


def test_the_hold_governor_settles_a_card_on_its_line() -> None:
    """A first-order card (the benchmark's: 37 °C idle, 100 °C at full duty, τ 40 s, slowdown
    87 °C) run at whatever duty the governor allows settles at the hold line from below,
    without ever reaching slowdown: the model's feed-forward plus the sensor's correction."""
    pressure = INCIDENT.pressure.model_copy(update={
        "hold": Hold(below_slowdown_c=1.5), "sample_interval": 1.0, "lookahead": None})
    policy = INCIDENT.model_copy(update={"pressure": pressure})
    temperature, state = 37.0, None
    path = []
    for t in range(900):
        duty = 1.0 if state is None or state.duty_budget is None else state.duty_budget
        target = 37.0 + 63.0 * duty
        temperature = target + (temperature - target) * math.exp(-1.0 / 40.0)
        power = 70.0 + 630.0 * duty
        reading = GpuSample(index=0, uuid="GPU-0", name="Held", taken_at=float(t),
                            temperature_c=temperature, slowdown_c=87.0, utilization=duty,
                            power_w=power, power_limit_w=700.0)
        state = assess([reading], state, policy, float(t))
        path.append(temperature)
    assert max(path) < 87.0
    assert sum(path[-300:]) / 300 == pytest.approx(85.5, abs=0.3)
    assert state is not None and state.duty_budget == pytest.approx((85.5 - 37) / 63, abs=0.02)


def test_no_hold_no_pacing() -> None:
    card = TwoStageCard()
    states = run(replay(card, [(60, 0.1), (240, 0.9)]))
    assert all(s.duty_budget is None for s in states)
