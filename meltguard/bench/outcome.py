"""What one benchmark point produced, and the figures reported for it.

The live benchmark and the offline simulator both hand in `RequestRecord`s and
`TelemetryPoint`s (model seconds) and get a `PointResult` back from `summarize`, so the two
are compared figure for figure, computed by the same code.

Definitions (the measured window is [warmup, warmup + duration) of arrival times):
- a request *succeeds* when it is answered with images within its tier's deadline; goodput is
  the images of successful requests per second of the window, and its ratio to the
  sustainable capacity;
- *admitted* requests are those answered with images plus those still unanswered when the
  point gave up (their latency is a lower bound: the time until then); p50/p99 are over them;
- *refused* requests are every other answer, counted by its error code;
- a degraded image (fewer steps, smaller) counts as one image in goodput; `work` weighs each
  by the share of the asked pixels x steps it got, so `work_ratio` is goodput in full-quality
  images and shows what degradation bought;
- thermal figures cover the whole run, warm-up and drain included: heat is not forgiven
  because it happened before the measuring started.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meltguard.bench.scenario import Scenario
from meltguard.values import Size

OK = "ok"
UNANSWERED = "unanswered"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    t: float  # arrival, model seconds from the start of the run
    tier: str
    status: int  # HTTP status; 0 when no answer came before the point gave up
    code: str  # "ok", an ErrorCode value, or "unanswered"
    latency_s: float  # model seconds from arrival to answer (or to giving up)
    degraded: bool = False
    images: int = 0
    work: float = 0.0  # images delivered, weighted by the share of the asked pixels x steps


@dataclass(frozen=True, slots=True)
class TelemetryPoint:
    t: float  # model seconds from the start of the run
    temperature_c: float
    throttled: bool  # the card reports hw_thermal
    level: int  # the daemon's overall pressure level (0 normal .. 3 critical)
    admitted: int = 0  # admission decisions so far that let a request through
    refused: int = 0  # admission decisions so far that refused one
    energy_j: float | None = None  # the card's energy counter (model joules), where it has one


@dataclass(frozen=True, slots=True)
class Transition:
    """The controller's overall pressure level changed (what `meltguard simulate` reports)."""

    t: float  # model seconds from the start of the run
    level: str
    reasons: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"t": round(self.t, 3), "level": self.level, "reasons": list(self.reasons)}


@dataclass(frozen=True, slots=True)
class TierSummary:
    tier: str
    offered: int
    succeeded: int
    degraded: int  # succeeded with a degraded job
    late: int  # answered with images after the deadline
    refused: Mapping[str, int]
    unanswered: int
    p50_s: float | None
    p99_s: float | None

    @property
    def success_rate(self) -> float:
        return self.succeeded / self.offered if self.offered else 1.0


@dataclass(frozen=True, slots=True)
class PointResult:
    strategy: str
    load: float
    duration_s: float
    offered_rps: float
    capacity_ips: float
    good_images: int
    good_work: float
    p50_s: float | None
    p99_s: float | None
    tiers: tuple[TierSummary, ...]
    refused: Mapping[str, int]
    peak_c: float | None
    above_slowdown_s: float
    throttled_s: float
    slowdown_c: float | None  # None: a recorded card that says nothing of it
    telemetry: tuple[TelemetryPoint, ...] = field(default=(), repr=False)
    # (bin start, answered with images per second, refused per second), by arrival time
    admissions: tuple[tuple[float, float, float], ...] = field(default=(), repr=False)
    # Level changes, where the run recorded them (the offline simulator does; the live
    # benchmark samples only the level); None: not recorded.
    transitions: tuple[Transition, ...] | None = field(default=None, repr=False)
    # The card's energy over the measured window (model joules), from its counter; None
    # where the telemetry has no counter.
    energy_j: float | None = None

    @property
    def joules_per_work(self) -> float | None:
        """Joules per full-quality image: the window's energy over its full-quality work."""
        if self.energy_j is None or not self.good_work:
            return None
        return self.energy_j / self.good_work

    @property
    def goodput_ips(self) -> float:
        return self.good_images / self.duration_s

    @property
    def goodput_ratio(self) -> float:
        return self.goodput_ips / self.capacity_ips if self.capacity_ips else 0.0

    @property
    def work_ratio(self) -> float:
        if not self.capacity_ips:
            return 0.0
        return self.good_work / self.duration_s / self.capacity_ips

    def tier(self, name: str) -> TierSummary | None:
        return next((t for t in self.tiers if t.tier == name), None)

    def image_share(self, name: str) -> float:
        """The tier's share of the good answers (one image each in the benchmark): what a
        min_share reserves is judged by."""
        total = sum(t.succeeded for t in self.tiers)
        tier = self.tier(name)
        return tier.succeeded / total if tier is not None and total else 0.0

    def to_json(self, *, series: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "strategy": self.strategy,
            "load": self.load,
            "duration_s": self.duration_s,
            "offered_rps": round(self.offered_rps, 6),
            "capacity_ips": round(self.capacity_ips, 6),
            "good_images": self.good_images,
            "goodput_ips": round(self.goodput_ips, 6),
            "goodput_ratio": round(self.goodput_ratio, 4),
            "good_work": round(self.good_work, 3),
            "work_ratio": round(self.work_ratio, 4),
            "p50_s": _round(self.p50_s),
            "p99_s": _round(self.p99_s),
            "refused": dict(self.refused),
            "peak_c": _round(self.peak_c),
            "above_slowdown_s": round(self.above_slowdown_s, 3),
            "throttled_s": round(self.throttled_s, 3),
            "slowdown_c": self.slowdown_c,
            "energy_j": _round(self.energy_j, 1),
            "joules_per_full_quality_image": _round(self.joules_per_work, 1),
            "tiers": {
                t.tier: {
                    "offered": t.offered,
                    "succeeded": t.succeeded,
                    "success_rate": round(t.success_rate, 4),
                    "image_share": round(self.image_share(t.tier), 4),
                    "degraded": t.degraded,
                    "late": t.late,
                    "refused": dict(t.refused),
                    "unanswered": t.unanswered,
                    "p50_s": _round(t.p50_s),
                    "p99_s": _round(t.p99_s),
                }
                for t in self.tiers
            },
        }
        if self.transitions is not None:
            out["transitions"] = [t.to_json() for t in self.transitions]
        if series:
            out["telemetry"] = [
                [round(p.t, 2), round(p.temperature_c, 2), int(p.throttled), p.level,
                 p.admitted, p.refused]
                for p in self.telemetry
            ]
            out["answers"] = [[round(a, 2), round(b, 4), round(c, 4)]
                              for a, b, c in self.admissions]
        return out


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def delivered_work(
    asked_size: Size, asked_steps: int, size: Size, steps: int, images: int
) -> float:
    """Images weighted by the share of the asked pixels x steps each one got."""
    asked = asked_size.pixels * asked_steps
    return images * (size.pixels * steps) / asked if asked else float(images)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: a p99 is a latency someone really had)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summarize(
    *,
    strategy: str,
    load: float,
    scenario: Scenario,
    capacity_ips: float,
    requests: Iterable[RequestRecord],
    telemetry: Sequence[TelemetryPoint],
    bin_s: float = 10.0,
    slowdown_c: float | None = None,
    use_model_slowdown: bool = True,
    transitions: Sequence[Transition] | None = None,
) -> PointResult:
    """Figures of one point. The slowdown temperature is the simulated card's unless the
    caller gives one (`slowdown_c`) or says the card is not the model (`use_model_slowdown`
    False: a replayed trace), when None means it is not known."""
    start, end = scenario.warmup_s, scenario.end_s
    records = list(requests)
    window = [r for r in records if start <= r.t < end]
    tiers = [t.tier for t in scenario.tiers]
    tiers += sorted({r.tier for r in window} - set(tiers))
    summaries = tuple(_tier(name, [r for r in window if r.tier == name], scenario)
                      for name in tiers)
    admitted = [r.latency_s for r in window if r.code in (OK, UNANSWERED)]
    good = sum(r.images for r in window if _good(r, scenario))
    work = sum(r.work for r in window if _good(r, scenario))
    refused = Counter(r.code for r in window if r.code not in (OK, UNANSWERED))
    slowdown = slowdown_c
    if slowdown is None and use_model_slowdown:
        slowdown = scenario.gpu.slowdown_c
    line = slowdown
    return PointResult(
        strategy=strategy,
        load=load,
        duration_s=scenario.duration_s,
        offered_rps=len(window) / scenario.duration_s,
        capacity_ips=capacity_ips,
        good_images=good,
        good_work=work,
        p50_s=percentile(admitted, 50),
        p99_s=percentile(admitted, 99),
        tiers=summaries,
        refused=dict(sorted(refused.items())),
        peak_c=max((p.temperature_c for p in telemetry), default=None),
        above_slowdown_s=(0.0 if line is None else
                          _time_where(telemetry, lambda p: p.temperature_c >= line)),
        throttled_s=_time_where(telemetry, lambda p: p.throttled),
        slowdown_c=slowdown,
        telemetry=tuple(telemetry),
        admissions=_admissions(records, scenario, bin_s),
        transitions=None if transitions is None else tuple(transitions),
        energy_j=_window_energy(telemetry, start, end),
    )


def _window_energy(points: Sequence[TelemetryPoint], start: float, end: float) -> float | None:
    """The counter's rise over [start, end], from the readings inside it, scaled to the whole
    window (the first and last readings fall a sample interval inside its edges)."""
    inside = [p for p in points if p.energy_j is not None and start <= p.t <= end]
    if len(inside) < 2 or inside[-1].t <= inside[0].t:
        return None
    first, last = inside[0], inside[-1]
    assert first.energy_j is not None and last.energy_j is not None
    return (last.energy_j - first.energy_j) * (end - start) / (last.t - first.t)


def _good(record: RequestRecord, scenario: Scenario) -> bool:
    return record.code == OK and record.latency_s <= scenario.deadline(record.tier)


def _tier(name: str, records: Sequence[RequestRecord], scenario: Scenario) -> TierSummary:
    good = [r for r in records if _good(r, scenario)]
    admitted = [r.latency_s for r in records if r.code in (OK, UNANSWERED)]
    refused = Counter(r.code for r in records if r.code not in (OK, UNANSWERED))
    return TierSummary(
        tier=name,
        offered=len(records),
        succeeded=len(good),
        degraded=sum(1 for r in good if r.degraded),
        late=sum(1 for r in records if r.code == OK and not _good(r, scenario)),
        refused=dict(sorted(refused.items())),
        unanswered=sum(1 for r in records if r.code == UNANSWERED),
        p50_s=percentile(admitted, 50),
        p99_s=percentile(admitted, 99),
    )


def _time_where(points: Sequence[TelemetryPoint], holds: Any) -> float:
    """Seconds for which the condition held, each reading standing until the next one."""
    total = 0.0
    for here, after in itertools.pairwise(points):
        if holds(here):
            total += max(after.t - here.t, 0.0)
    return total


def _admissions(
    records: Sequence[RequestRecord], scenario: Scenario, bin_s: float
) -> tuple[tuple[float, float, float], ...]:
    """(bin start, answered with images per second, refused per second) by arrival time."""
    bins = max(1, math.ceil(scenario.end_s / bin_s))
    served = [0] * bins
    refused = [0] * bins
    for r in records:
        index = min(int(r.t // bin_s), bins - 1)
        if r.code == OK:
            served[index] += 1
        elif r.code != UNANSWERED:
            refused[index] += 1
    return tuple((i * bin_s, served[i] / bin_s, refused[i] / bin_s) for i in range(bins))
