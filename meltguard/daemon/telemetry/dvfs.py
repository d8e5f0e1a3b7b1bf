"""How fast a GPU works under a power limit: a published performance-vs-power-limit curve.

A power limit below what the work would draw makes the card's firmware lower clocks and voltage
(DVFS) until the draw fits. Near the top of the clock range the voltage a clock needs climbs
steeply, so the last few percent of throughput cost a large share of the power: capping the
power gives up much less work than it saves.

The curve is measured, not modelled. Source: J. You, J.-W. Chung and M. Chowdhury, "Zeus:
Understanding and Optimizing GPU Energy Consumption of DNN Training", USENIX NSDI 2023; the
paper's published trace `examples/research_reproducibility/zeus_nsdi23/trace/summary_power_a40.csv`
(github.com/ml-energy/zeus): ImageNet ResNet-50 training at batch size 256 on an NVIDIA A40
(300 W default limit), epoch time and average power at power limits of 100-300 W. A convolutional
network at a large batch is the closest workload there to a diffusion UNet's denoising steps:
compute-bound, every SM busy. Uncapped, the card drew 235.2 W and took 3847.48 s per epoch.

Each point is (the average draw at a limit as a fraction of the uncapped draw, the throughput as
a fraction of the uncapped throughput), i.e. 235.2 W / 3847.48 s scaled to 1. The x axis is the
draw rather than the limit because a card does not draw its whole default limit on every
workload (the A40 drew 235 of its 300 W), and the draw is what a limit constrains.
"""

from __future__ import annotations

import bisect

# (draw ÷ uncapped draw, throughput ÷ uncapped throughput), from the trace rows at limits
# 100, 125, ..., 300 W (average_power ÷ 235.21, 3847.48 ÷ time_per_epoch), ascending.
ZEUS_A40_RESNET50_B256: tuple[tuple[float, float], ...] = (
    (120.74 / 235.21, 3847.48 / 10606.19),
    (125.51 / 235.21, 3847.48 / 9639.82),
    (144.61 / 235.21, 3847.48 / 6326.84),
    (160.23 / 235.21, 3847.48 / 4705.61),
    (177.58 / 235.21, 3847.48 / 4123.52),
    (196.41 / 235.21, 3847.48 / 3909.47),
    (214.63 / 235.21, 3847.48 / 3864.98),
    (230.85 / 235.21, 3847.48 / 3857.81),
    (1.0, 1.0),
)


def throughput_at(power_ratio: float,
                  curve: tuple[tuple[float, float], ...] = ZEUS_A40_RESNET50_B256) -> float:
    """Throughput, as a fraction of full speed, of work allowed `power_ratio` of the power it
    would draw uncapped. Linear between the measured points; at or above 1 the cap does not bind
    (1.0); below the lowest point, throughput falls in proportion to power from there (the
    measurement stops where the card's static power dominates)."""
    if power_ratio >= curve[-1][0]:
        return curve[-1][1]
    low_x, low_y = curve[0]
    if power_ratio <= low_x:
        return max(power_ratio, 0.0) * low_y / low_x
    i = bisect.bisect_right(curve, power_ratio, key=lambda point: point[0])
    (x0, y0), (x1, y1) = curve[i - 1], curve[i]
    return y0 + (y1 - y0) * (power_ratio - x0) / (x1 - x0)
