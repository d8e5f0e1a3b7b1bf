"""The published performance-vs-power curve the simulated GPU slows down by."""

from __future__ import annotations

import itertools

import pytest

from meltguard.daemon.telemetry.dvfs import ZEUS_A40_RESNET50_B256, throughput_at


def test_the_curve_is_the_published_trace_scaled_to_its_uncapped_point() -> None:
    # Spot checks against the trace rows (limit W: time_per_epoch s, average_power W).
    assert throughput_at(214.63 / 235.21) == pytest.approx(3847.48 / 3864.98)  # 250 W
    assert throughput_at(177.58 / 235.21) == pytest.approx(0.9331, abs=1e-4)  # 200 W
    assert throughput_at(144.61 / 235.21) == pytest.approx(0.6081, abs=1e-4)  # 150 W


def test_rising_in_both_axes() -> None:
    for (x0, y0), (x1, y1) in itertools.pairwise(ZEUS_A40_RESNET50_B256):
        assert x1 > x0 and y1 > y0


def test_performance_falls_much_more_slowly_than_power_near_the_top() -> None:
    # The claim the power lever rests on: 80% of the power keeps over 95% of the work.
    assert throughput_at(0.8) > 0.95
    assert throughput_at(0.9) > 0.99
    # and the knee is real: far down, work falls faster than power.
    assert throughput_at(0.55) < 0.5


def test_no_cap_and_the_ends() -> None:
    assert throughput_at(1.0) == 1.0
    assert throughput_at(1.7) == 1.0
    low_x, low_y = ZEUS_A40_RESNET50_B256[0]
    assert throughput_at(low_x) == pytest.approx(low_y)
    assert throughput_at(low_x / 2) == pytest.approx(low_y / 2)
    assert throughput_at(0.0) == 0.0
    assert throughput_at(-1.0) == 0.0


@pytest.mark.parametrize("ratio", [0.52, 0.6, 0.7, 0.75, 0.85, 0.95, 0.99])
def test_interpolates_between_neighbours(ratio: float) -> None:
    below = max(p for p in ZEUS_A40_RESNET50_B256 if p[0] <= ratio)
    above = min(p for p in ZEUS_A40_RESNET50_B256 if p[0] > ratio)
    assert below[1] <= throughput_at(ratio) <= above[1]
