"""Results of a benchmark run: the targets checked, results.json, results.md and the plots."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meltguard.admission.policy import Level, Policy
from meltguard.bench.outcome import PointResult, TelemetryPoint
from meltguard.bench.scenario import Capacity

TARGET_LOADS = (5.0, 10.0)
# The headline (issue 15): full-quality work, each image weighted by the steps x pixels it
# got, at least this share of the sustainable capacity.
WORK_TARGET = 0.95
PRO_SUCCESS_TARGET = 0.99
# meltguard-power: full-quality work beyond what duty cycling can sustain, from the power lever.
POWER_TARGET_LOADS = (10.0,)
POWER_WORK_TARGET = 1.1
STRATEGY_COLORS = {
    "meltguard": "#1b7837",
    "meltguard-power": "#762a83",
    "none": "#b2182b",
    "token-bucket": "#ef8a62",
    "fixed-concurrency": "#2166ac",
}


@dataclass(frozen=True, slots=True)
class Verdict:
    subject: str  # "meltguard @ 5x" or a baseline's name
    claim: str
    met: bool
    detail: str
    kind: str = "target"  # "target": meltguard's; "failure mode": a baseline's known flaw

    def line(self) -> str:
        if self.kind == "target":
            word = "MET" if self.met else "NOT MET"
        else:
            word = "shown" if self.met else "NOT shown"
        return f"{self.kind} {self.subject}: {self.claim}: {word} ({self.detail})"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "subject": self.subject, "claim": self.claim,
                "met": self.met, "detail": self.detail}


def queue_wait_bound(policy: Policy, tier: str) -> float:
    """The longest queue wait the policy allows the tier at any level."""
    return max(policy.effective(tier, level).max_queue_wait for level in Level)


def evaluate(results: Sequence[PointResult], policy: Policy, cap: Capacity) -> list[Verdict]:
    verdicts: list[Verdict] = []
    for point in results:
        if point.strategy != "meltguard" or point.load not in TARGET_LOADS:
            continue
        subject = f"meltguard @ {point.load:g}x"
        verdicts.append(Verdict(subject, f"full-quality work >= {WORK_TARGET} x capacity",
                                point.work_ratio >= WORK_TARGET,
                                f"{point.work_ratio:.3f}; images {point.goodput_ratio:.3f}"))
        slowdown = point.slowdown_c if point.slowdown_c is not None else cap.slowdown_c
        cool = (point.peak_c is not None and point.peak_c < slowdown
                and point.throttled_s == 0)
        verdicts.append(Verdict(subject, f"peak < {slowdown:g} °C, 0 s throttled", cool,
                                f"peak {point.peak_c or 0:.2f} °C, "
                                f"{point.throttled_s:.1f} s throttled"))
        pro = point.tier("pro")
        if pro is not None:
            verdicts.append(Verdict(subject, f"pro success >= {PRO_SUCCESS_TARGET:.0%}",
                                    pro.success_rate >= PRO_SUCCESS_TARGET,
                                    f"{pro.success_rate:.2%} of {pro.offered}"))
        for tier in point.tiers:
            if tier.tier not in policy.tiers:
                continue
            bound = queue_wait_bound(policy, tier.tier) + 2 * cap.service_s
            p99 = tier.p99_s
            verdicts.append(Verdict(
                subject, f"{tier.tier} p99 <= max_queue_wait + 2 service = {bound:.1f} s",
                p99 is None or p99 <= bound,
                "no admitted requests" if p99 is None else f"p99 {p99:.2f} s"))
    verdicts.extend(_power_targets(results))
    verdicts.extend(_failure_modes(results))
    return verdicts


def _power_targets(results: Sequence[PointResult]) -> list[Verdict]:
    out: list[Verdict] = []
    for point in results:
        if point.strategy != "meltguard-power" or point.load not in POWER_TARGET_LOADS:
            continue
        subject = f"meltguard-power @ {point.load:g}x"
        joules = point.joules_per_work
        out.append(Verdict(subject, f"full-quality work >= {POWER_WORK_TARGET} x capacity",
                           point.work_ratio >= POWER_WORK_TARGET,
                           f"{point.work_ratio:.3f}; "
                           + (f"{joules:.0f} J per full-quality image" if joules is not None
                              else "no energy counter")))
        out.append(Verdict(subject, "0 s throttled", point.throttled_s == 0,
                           f"{point.throttled_s:.1f} s throttled, peak {point.peak_c or 0:.2f} °C"))
        pro = point.tier("pro")
        if pro is not None:
            out.append(Verdict(subject, f"pro success >= {PRO_SUCCESS_TARGET:.0%}",
                               pro.success_rate >= PRO_SUCCESS_TARGET,
                               f"{pro.success_rate:.2%} of {pro.offered}"))
    return out


def _failure_modes(results: Sequence[PointResult]) -> list[Verdict]:
    out: list[Verdict] = []
    by = {(r.strategy, r.load): r for r in results}
    loads = sorted({r.load for r in results})
    if not loads:
        return out
    low, high = loads[0], loads[-1]
    none = by.get(("none", high))
    if none is not None:
        longest = max(none.tiers, key=lambda t: t.p99_s or 0.0)
        out.append(Verdict(
            f"none @ {high:g}x", "throttles and p99 explodes",
            none.throttled_s > 0 and (none.p99_s or 0.0) > 120.0,
            f"{none.throttled_s:.0f} s throttled, p99 {none.p99_s or 0:.0f} s "
            f"({longest.tier} worst)", kind="failure mode"))
    bucket_low, bucket_high = by.get(("token-bucket", low)), by.get(("token-bucket", high))
    if bucket_low is not None and bucket_high is not None:
        wasted = sum(bucket_low.refused.values())
        out.append(Verdict(
            "token-bucket", f"wastes capacity at {low:g}x or overheats at {high:g}x",
            (wasted > 0 and (bucket_low.peak_c or 0) < (bucket_low.slowdown_c or math.inf))
            or bucket_high.throttled_s > 0,
            f"{wasted} refused at {low:g}x with peak {bucket_low.peak_c or 0:.1f} °C; "
            f"{bucket_high.throttled_s:.0f} s throttled at {high:g}x", kind="failure mode"))
    fixed = by.get(("fixed-concurrency", high))
    if fixed is not None:
        pro, free = fixed.tier("pro"), fixed.tier("free")
        if pro is not None and free is not None:
            out.append(Verdict(
                f"fixed-concurrency @ {high:g}x", "no tier protection",
                pro.success_rate < PRO_SUCCESS_TARGET
                and abs(pro.success_rate - free.success_rate) < 0.15,
                f"pro {pro.success_rate:.1%} vs free {free.success_rate:.1%}",
                kind="failure mode"))
    return out


# ---- tables ---------------------------------------------------------------------------------


def markdown_table(results: Iterable[PointResult]) -> str:
    header = (
        "| strategy | load | offered req/s | goodput img/s | goodput / capacity | "
        "full-quality / capacity | p50 s | p99 s | success free / plus / pro | "
        "share of images free / plus / pro | refused | peak °C | s ≥ slowdown | s throttled | "
        "J / full-quality image |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in sorted(results, key=lambda r: (r.load, _order(r.strategy))):
        success = " / ".join(f"{t.success_rate:.0%}" for t in r.tiers)
        shares = " / ".join(f"{r.image_share(t.tier):.0%}" for t in r.tiers)
        refused = ", ".join(f"{code} {count}" for code, count in r.refused.items()) or "-"
        rows.append(
            f"| {r.strategy} | {r.load:g}x | {r.offered_rps:.3f} | {r.goodput_ips:.3f} | "
            f"{r.goodput_ratio:.2f} | {r.work_ratio:.2f} | {_s(r.p50_s)} | {_s(r.p99_s)} | "
            f"{success} | {shares} | {refused} | {_s(r.peak_c, 1)} | {r.above_slowdown_s:.0f} | "
            f"{r.throttled_s:.0f} | {_s(r.joules_per_work, 0)} |"
        )
    return header + "\n".join(rows) + "\n"


def _order(strategy: str) -> int:
    names = list(STRATEGY_COLORS)
    return names.index(strategy) if strategy in names else len(names)


def _g(value: object) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def _s(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_reports(
    out: Path,
    results: Sequence[PointResult],
    verdicts: Sequence[Verdict],
    *,
    config: Mapping[str, Any],
    plots: bool = True,
) -> str:
    """results.json (the figures), series.json (temperature paths and admissions over time),
    results.md and (unless told not to) the PNGs; returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "config": dict(config),
        "points": [r.to_json(series=False) for r in results],
        "verdicts": [v.to_json() for v in verdicts],
    }
    (out / "results.json").write_text(json.dumps(document, indent=1) + "\n")
    series = {
        "columns": {"telemetry": ["t_s", "temperature_c", "throttled", "level", "admitted",
                                  "refused"],
                    "answers": ["bin_start_s", "answered_with_images_per_s",
                                "refused_per_s"]},
        "points": [{key: value for key, value in r.to_json().items()
                    if key in ("strategy", "load", "telemetry", "answers")} for r in results],
    }
    # One point per line: diffable, and a quarter of the size indented JSON would take.
    lines_out = ",\n".join(json.dumps(p, separators=(",", ":")) for p in series["points"])
    (out / "series.json").write_text(
        '{"columns":' + json.dumps(series["columns"]) + ',"points":[\n' + lines_out + "\n]}\n")
    table = markdown_table(results)
    capacity = config.get("capacity")
    capacity_text = str(capacity.get("text", "")) if isinstance(capacity, Mapping) else ""
    lines = [
        "# meltguard bench results", "",
        capacity_text, "",
        f"Time compression x{_g(config.get('speed'))}, {_g(config.get('warmup_s'))} s warm-up "
        f"then {_g(config.get('duration_s'))} s measured per point (model seconds).", "",
        table,
        "## Targets and baselines", "",
        *[f"- {v.line()}" for v in verdicts], "",
    ]
    if plots:
        names = plot_all(out, results)
        lines += ["## Plots", "", *[f"![{name}]({name})" for name in names], ""]
    (out / "results.md").write_text("\n".join(lines))
    return table


# ---- plots ----------------------------------------------------------------------------------


def admission_rate(
    points: Sequence[TelemetryPoint], window_s: float = 20.0
) -> tuple[list[float], list[float]]:
    """Admissions per second over a trailing window, from the cumulative decision counts."""
    times: list[float] = []
    rates: list[float] = []
    start = 0
    for point in points:
        while points[start].t < point.t - window_s:
            start += 1
        span = point.t - points[start].t
        if span > 0:
            times.append(point.t)
            rates.append((point.admitted - points[start].admitted) / span)
    return times, rates


def plot_all(out: Path, results: Sequence[PointResult]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list[str] = []
    strategies = sorted({r.strategy for r in results}, key=_order)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for strategy in strategies:
        points = sorted((r for r in results if r.strategy == strategy), key=lambda r: r.load)
        color = STRATEGY_COLORS.get(strategy)
        loads = [p.load for p in points]
        left.plot(loads, [p.goodput_ratio for p in points], "o-", color=color, label=strategy)
        left.plot(loads, [p.work_ratio for p in points], ":", color=color, alpha=0.7)
        right.plot(loads, [p.peak_c or 0.0 for p in points], "o-", color=color, label=strategy)
    left.axhline(1.0, color="grey", lw=0.8, label="sustainable capacity")
    left.axhline(WORK_TARGET, color="grey", lw=0.8, ls="--",
                 label="full-quality target at 5x, 10x")
    left.set(xscale="log", xlabel="offered load (x sustainable capacity)",
             ylabel="goodput / sustainable capacity",
             title="Goodput (solid: images, dotted: full-quality work)")
    slowdown = (results[0].slowdown_c if results else None) or 87.0
    right.axhline(slowdown, color="black", lw=0.8, ls="--", label="slowdown")
    right.set(xscale="log", xlabel="offered load (x sustainable capacity)",
              ylabel="peak GPU temperature (°C)", title="Peak temperature")
    for axis in (left, right):
        _finish_load_axis(axis, results)
    fig.tight_layout()
    fig.savefig(out / "goodput_and_peak.png", dpi=110)
    plt.close(fig)
    names.append("goodput_and_peak.png")

    with_energy = [r for r in results if r.joules_per_work is not None]
    if with_energy:
        fig, axis = plt.subplots(figsize=(7, 4))
        for strategy in strategies:
            points = sorted((r for r in with_energy if r.strategy == strategy),
                            key=lambda r: r.load)
            if points:
                axis.plot([p.load for p in points], [p.joules_per_work for p in points], "o-",
                          color=STRATEGY_COLORS.get(strategy), label=strategy)
        # Log scale: an overloaded baseline spends tens of times more per good image.
        axis.set(xscale="log", yscale="log", xlabel="offered load (x sustainable capacity)",
                 ylabel="J per full-quality image",
                 title="GPU energy per full-quality image (the card's counter)")
        _finish_load_axis(axis, with_energy)
        fig.tight_layout()
        fig.savefig(out / "energy_per_image.png", dpi=110)
        plt.close(fig)
        names.append("energy_per_image.png")

    loads = sorted({r.load for r in results})
    if loads:
        target = min(loads, key=lambda load: abs(load - 5.0))
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
        # meltguard last, so the baselines' overlapping saw-tooths do not hide it.
        at_target = sorted((r for r in results if r.load == target),
                           key=lambda r: -_order(r.strategy))
        for r in at_target:
            color = STRATEGY_COLORS.get(r.strategy)
            top.plot([p.t for p in r.telemetry], [p.temperature_c for p in r.telemetry],
                     color=color, lw=1.0, label=r.strategy)
            times, rates = admission_rate(r.telemetry)
            bottom.plot(times, rates, color=color, lw=1.0, label=r.strategy)
        top.axhline(slowdown, color="black", lw=0.8, ls="--", label="slowdown")
        top.set(ylabel="GPU temperature (°C)",
                title=f"Temperature and admissions over time at {target:g}x offered load")
        bottom.set(xlabel="model seconds", ylabel="requests let through to the GPU / s")
        for axis in (top, bottom):
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        name = f"timeline_{target:g}x.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def _finish_load_axis(axis: Any, results: Sequence[PointResult]) -> None:
    """Offered loads as the x ticks ("5x"), a light grid and the legend."""
    loads = sorted({r.load for r in results})
    axis.set_xticks(loads, [f"{load:g}x" for load in loads])
    axis.minorticks_off()
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
