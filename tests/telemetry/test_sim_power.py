"""The simulated card's power limit: a lever like NVML's, and the slowdown it causes."""

from __future__ import annotations

import pytest

from meltguard.daemon.telemetry.dvfs import throughput_at
from meltguard.daemon.telemetry.sim_power import SimPowerLimit
from meltguard.protocols import PowerLimits


def lever() -> SimPowerLimit:
    return SimPowerLimit(index=0, default_w=700.0, min_w=200.0, max_w=700.0)


def test_it_is_a_power_lever() -> None:
    assert isinstance(lever(), PowerLimits)


def test_reads_and_sets_like_the_driver() -> None:
    card = lever()
    assert card.default_power_limit_w(0) == 700.0
    assert card.power_limit_range_w(0) == (200.0, 700.0)
    assert card.set_power_limit_w(0, 560.0) == "success"
    assert card.limit_w == 560.0
    assert card.set_power_limit_w(0, 150.0) == "nvml_invalid_argument"
    assert card.set_power_limit_w(0, 701.0) == "nvml_invalid_argument"
    assert card.limit_w == 560.0


def test_another_gpu_has_no_lever_here() -> None:
    card = lever()
    assert card.default_power_limit_w(1) is None
    assert card.power_limit_range_w(1) is None
    assert card.set_power_limit_w(1, 500.0) == "nvml_no_handle"


def test_slowdown_follows_the_published_curve() -> None:
    card = lever()
    assert card.slowdown(700.0) == 1.0
    card.set_power_limit_w(0, 560.0)
    assert card.slowdown(700.0) == pytest.approx(1 / throughput_at(0.8))
    assert 1.0 < card.slowdown(700.0) < 1.05
    assert card.slowdown(500.0) == 1.0  # work that draws less than the limit is not slowed
    assert card.slowdown(0.0) == 1.0


def test_bad_ranges_are_refused() -> None:
    with pytest.raises(ValueError, match="min_w <= default_w"):
        SimPowerLimit(index=0, default_w=700.0, min_w=800.0, max_w=900.0)
