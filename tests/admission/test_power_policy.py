"""The policy's `power` section: the power-limit ratio each pressure level asks for."""

from __future__ import annotations

import pytest

from meltguard.admission.policy import Level, PolicyError, parse_policy

BASE = {"version": 1, "tiers": {"free": {"priority": 0}}}


def _ratios(power: dict[str, float]) -> list[float | None]:
    policy = parse_policy({**BASE, "power": power})
    return [policy.power_ratio(level) for level in Level]


def test_no_section_keeps_the_default_limit_everywhere() -> None:
    policy = parse_policy(BASE)
    assert [policy.power_ratio(level) for level in Level] == [None, None, None, None]


def test_each_level_gets_its_ratio_and_normal_the_default() -> None:
    assert _ratios({"elevated": 0.8, "high": 0.7, "critical": 0.6}) == [None, 0.8, 0.7, 0.6]


def test_a_level_left_out_keeps_the_ratio_below_it() -> None:
    assert _ratios({"high": 0.7}) == [None, None, 0.7, 0.7]
    assert _ratios({"elevated": 0.9, "critical": 0.5}) == [None, 0.9, 0.9, 0.5]


def test_equal_ratios_on_neighbouring_levels_are_allowed() -> None:
    assert _ratios({"elevated": 0.7, "high": 0.7}) == [None, 0.7, 0.7, 0.7]


@pytest.mark.parametrize("ratio", [1.0, 0.01])
def test_ratio_bounds_are_inclusive_at_one(ratio: float) -> None:
    assert _ratios({"elevated": ratio})[1] == ratio


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy({**BASE, "power": {"hot": 0.5, "elevated": 0.6, "high": 0.9}})
    assert [issue.dotted() for issue in caught.value.issues] == ["power.hot", "power.high"]
