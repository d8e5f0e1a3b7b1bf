"""The power lever in the shipped policies: the examples that promise it have it, it never
loosens as a card heats, shadow mode only logs it, and no level is capped where its own (or a
hotter level's) signals read the power draw against the limit the cap itself lowers."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from meltguard.admission.policy import LEVEL_NAMES, Level, Policy
from meltguard.daemon.policy_file import load_policy_file
from meltguard.daemon.power import PowerActuator

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "policies" / "examples"
SHIPPED = sorted([*ROOT.glob("policies/*.yaml"), *EXAMPLES.glob("*.yaml")])
HOTTER = (Level.NORMAL, Level.ELEVATED, Level.HIGH, Level.CRITICAL)


def example(name: str) -> Policy:
    return load_policy_file(EXAMPLES / name).policy


def ladder(policy: Policy) -> list[float | None]:
    return [policy.power_ratio(level) for level in HOTTER]


def test_incident_caps_power_from_elevated_and_tightens_as_it_heats() -> None:
    ratios = ladder(example("incident.yaml"))
    assert ratios[0] is None  # normal runs at the card's default limit
    capped = [r for r in ratios[1:] if r is not None]
    assert len(capped) == 3 and all(0.0 < r < 1.0 for r in capped), ratios
    assert capped == sorted(capped, reverse=True)
    assert len(set(capped)) == 3  # each hotter level cuts deeper


def test_shadow_rollout_carries_the_incident_lever_and_only_logs_it() -> None:
    shadow = example("shadow-rollout.yaml")
    assert shadow.mode == "shadow"
    assert shadow.power == example("incident.yaml").power

    class Card:
        def __init__(self) -> None:
            self.sets: list[float] = []

        def default_power_limit_w(self, gpu: int) -> float | None:
            return 700.0

        def power_limit_range_w(self, gpu: int) -> tuple[float, float] | None:
            return (200.0, 700.0)

        def set_power_limit_w(self, gpu: int, watts: float) -> str:
            self.sets.append(watts)
            return "success"

    card = Card()
    actuator = PowerActuator(card)
    with capture_logs() as logs:
        for level in (Level.NORMAL, Level.ELEVATED, Level.CRITICAL, Level.NORMAL):
            actuator.follow({0: level}, shadow)
    assert card.sets == []
    would = [(line["pressure"], line["watts"]) for line in logs
             if line["event"] == "power.would_set"]
    assert would == [("elevated", round(700.0 * shadow.power["elevated"], 1)),
                     ("critical", round(700.0 * shadow.power["critical"], 1)),
                     ("normal", 700.0)]


def test_strict_thermal_caps_only_above_its_power_signal() -> None:
    ratios = ladder(example("strict-thermal.yaml"))
    assert ratios[:2] == [None, None]
    assert ratios[2] is not None and ratios[3] is not None and ratios[3] <= ratios[2] < 1.0


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_level_reads_the_draw_against_a_limit_the_lever_lowers(path: Path) -> None:
    # power_ratio is the draw over the limit in force, and a capped busy card draws nearly all
    # of it: a capped level reading it would hold itself on, a hotter one would be driven to.
    policy = load_policy_file(path).policy
    capped = [name for name, level in zip(LEVEL_NAMES, HOTTER[1:], strict=True)
              if policy.power_ratio(level) is not None]
    if not capped:
        return
    for name in LEVEL_NAMES[LEVEL_NAMES.index(capped[0]):]:
        config = policy.pressure.levels.get(name)
        if config is not None:
            assert config.enter.power_ratio is None, f"{name} enters on power_ratio"
            assert config.exit.power_ratio is None, f"{name} exits on power_ratio"
