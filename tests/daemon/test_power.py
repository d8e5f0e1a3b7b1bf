"""The power actuator: each GPU's limit follows its level, set only on a change, refused once."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from structlog.testing import capture_logs

from meltguard.admission.policy import Level, Policy, parse_policy
from meltguard.admission.pressure import GpuPressure, PressureState
from meltguard.daemon.power import (
    CardLimits,
    PowerActuator,
    PowerCollector,
    PowerLever,
    gpu_levels,
    limit_for,
)

N, E, H, C = Level.NORMAL, Level.ELEVATED, Level.HIGH, Level.CRITICAL


def policy(power: Mapping[str, float] | None = None, mode: str = "enforce") -> Policy:
    data: dict[str, object] = {"version": 1, "mode": mode, "tiers": {"free": {"priority": 0}}}
    if power is not None:
        data["power"] = dict(power)
    return parse_policy(data)


LADDER = policy({"elevated": 0.8, "high": 0.7, "critical": 0.6})


class FakeCard:
    """PowerLimits for a few cards: 700 W default, 200-700 W accepted."""

    def __init__(self, default: float | None = 700.0, low: float = 200.0, high: float = 700.0,
                 result: str = "success") -> None:
        self.default = default
        self.range = (low, high)
        self.result = result
        self.calls: list[tuple[int, float]] = []

    def default_power_limit_w(self, gpu: int) -> float | None:
        return self.default

    def power_limit_range_w(self, gpu: int) -> tuple[float, float] | None:
        return self.range

    def set_power_limit_w(self, gpu: int, watts: float) -> str:
        self.calls.append((gpu, watts))
        return self.result


def test_limit_for_clamps_to_the_card() -> None:
    card = CardLimits(default_w=700.0, min_w=400.0, max_w=700.0)
    assert limit_for(None, card) == 700.0
    assert limit_for(0.8, card) == pytest.approx(560.0)
    assert limit_for(0.3, card) == 400.0
    assert limit_for(1.0, CardLimits(300.0, 100.0, 250.0)) == 250.0


def test_the_limit_follows_the_level_and_only_changes_are_set() -> None:
    card = FakeCard()
    actuator = PowerActuator(card)
    for level in (N, N, E, E, H, H, C, H, E, N, N):
        actuator.follow({0: level}, LADDER)
    watts = [round(w, 3) for _, w in card.calls]
    assert watts == [560.0, 490.0, 420.0, 490.0, 560.0, 700.0]
    assert actuator.changes == {(0, "success"): 6}
    assert actuator.in_force(0) is None


def test_no_power_section_never_touches_the_card() -> None:
    card = FakeCard()
    actuator = PowerActuator(card)
    for level in (N, E, H, C, N):
        actuator.follow({0: level, 1: level}, policy())
    actuator.shutdown()
    assert card.calls == []
    assert actuator.changes == {}


def test_each_gpu_follows_its_own_level() -> None:
    card = FakeCard()
    actuator = PowerActuator(card)
    actuator.follow({0: H, 1: N}, LADDER)
    assert card.calls == [(0, pytest.approx(490.0))]
    assert actuator.in_force(0) == 0.7 and actuator.in_force(1) is None


def test_a_reload_that_changes_the_ratio_is_applied_at_the_same_level() -> None:
    card = FakeCard()
    actuator = PowerActuator(card)
    actuator.follow({0: E}, LADDER)
    actuator.follow({0: E}, policy({"elevated": 0.9}))
    actuator.follow({0: E}, policy())
    assert [round(w) for _, w in card.calls] == [560, 630, 700]


def test_shutdown_restores_the_default_once() -> None:
    card = FakeCard()
    actuator = PowerActuator(card)
    actuator.follow({0: H, 1: E, 2: N}, LADDER)
    card.calls.clear()
    with capture_logs() as logs:
        actuator.shutdown()
        actuator.shutdown()
        actuator.follow({0: C}, LADDER)  # a sample after shutdown must not cap again
    assert sorted(card.calls) == [(0, 700.0), (1, 700.0)]
    assert [entry["why"] for entry in logs if entry["event"] == "power.limit_set"] == [
        "shutdown", "shutdown"]


def test_no_permission_is_said_once_and_admission_goes_on() -> None:
    card = FakeCard(result="nvml_no_permission")
    actuator = PowerActuator(card)
    with capture_logs() as logs:
        for level in (E, H, C, N, H):
            actuator.follow({0: level}, LADDER)
        actuator.shutdown()
    assert len(card.calls) == 1
    assert actuator.changes == {(0, "nvml_no_permission"): 1}
    unavailable = [entry for entry in logs if entry["event"] == "power.lever_unavailable"]
    assert len(unavailable) == 1
    assert unavailable[0]["log_level"] == "warning"
    assert "CAP_SYS_ADMIN" in unavailable[0]["hint"]


def test_an_unreadable_default_limit_means_no_lever() -> None:
    card = FakeCard(default=None)
    actuator = PowerActuator(card)
    actuator.follow({0: H}, LADDER)
    actuator.follow({0: C}, LADDER)
    assert card.calls == []
    assert actuator.changes == {(0, "unreadable"): 1}


def test_a_transient_failure_is_retried_at_the_next_change_not_every_sample() -> None:
    card = FakeCard(result="nvml_gpu_is_lost")
    actuator = PowerActuator(card)
    actuator.follow({0: H}, LADDER)
    actuator.follow({0: H}, LADDER)
    card.result = "success"
    actuator.follow({0: C}, LADDER)
    assert [round(w) for _, w in card.calls] == [490, 420]
    assert actuator.changes == {(0, "nvml_gpu_is_lost"): 1, (0, "success"): 1}


def test_shadow_mode_logs_what_it_would_set_and_sets_nothing() -> None:
    card = FakeCard()
    actuator = PowerActuator(card)
    shadow = LADDER.model_copy(update={"mode": "shadow"})
    with capture_logs() as logs:
        for level in (N, E, E, H, N):
            actuator.follow({0: level}, shadow)
    assert card.calls == []
    would = [(entry["pressure"], entry["watts"]) for entry in logs
             if entry["event"] == "power.would_set"]
    assert would == [("elevated", 560.0), ("high", 490.0), ("normal", 700.0)]
    assert actuator.changes == {(0, "shadow"): 3}


def test_switching_to_shadow_lifts_a_cap_and_back_to_enforce_sets_it() -> None:
    card = FakeCard()
    actuator = PowerActuator(card)
    actuator.follow({0: H}, LADDER)
    actuator.follow({0: H}, LADDER.model_copy(update={"mode": "shadow"}))
    actuator.follow({0: H}, LADDER)
    assert [round(w) for _, w in card.calls] == [490, 700, 490]


def test_gpu_levels_are_per_gpu() -> None:
    state = PressureState(
        gpus=(GpuPressure(index=0, level=H, entered_at=0.0),
              GpuPressure(index=3, level=N, entered_at=0.0)),
        level=H, entered_at=0.0, stale=False)
    assert gpu_levels(state) == {0: H, 3: N}
    assert gpu_levels(None) == {}


def test_collector_exports_the_changes() -> None:
    actuator = PowerActuator(FakeCard())
    registry = CollectorRegistry()
    registry.register(PowerCollector(actuator))
    actuator.follow({0: E}, LADDER)
    text = generate_latest(registry).decode()
    assert 'meltguard_power_limit_changes_total{gpu="0",result="success"} 1.0' in text


async def test_lever_runs_off_the_loop_and_restores_on_close() -> None:
    card = FakeCard()
    lever = PowerLever(PowerActuator(card))
    state = PressureState(gpus=(GpuPressure(index=0, level=H, entered_at=0.0),), level=H,
                          entered_at=0.0, stale=False)
    lever.follow(state, LADDER)
    lever.follow(state, LADDER)  # unchanged: not even handed to the thread
    await lever.close()
    assert [round(w) for _, w in card.calls] == [490, 700]
    lever.follow(state, LADDER)
    assert len(card.calls) == 2


def test_at_exit_restores_when_the_loop_never_closed_the_lever() -> None:
    card = FakeCard()
    lever = PowerLever(PowerActuator(card))
    lever.actuator.follow({0: C}, LADDER)
    lever._at_exit()  # what atexit runs when serve() died before its cleanup
    assert [round(w) for _, w in card.calls] == [420, 700]
    assert lever.actuator.in_force(0) is None


def test_the_restore_at_normal_names_the_level() -> None:
    actuator = PowerActuator(FakeCard())
    with capture_logs() as logs:
        actuator.follow({0: H}, LADDER)
        actuator.follow({0: N}, LADDER)
    assert [(e["pressure"], e["watts"]) for e in logs if e["event"] == "power.limit_set"] == [
        ("high", 490.0), ("normal", 700.0)]
