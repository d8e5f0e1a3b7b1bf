"""Joules per image: each batch's share of the card's energy while it ran.

The meter follows one card, the engine's (the lowest GPU index the telemetry watches, which is
the device CUDA calls 0 unless CUDA_VISIBLE_DEVICES reorders them). It builds a cumulative
energy curve from the telemetry samples: the card's own counter where NVML has one (Volta and
later), else the power readings integrated between samples. A batch's energy is the curve's rise
between the batch's start and end; its jobs share it by images (a batch's jobs all have one size
and one step count). The newest sample is up to one sample_interval old when a batch ends, so
the last stretch is extrapolated at the newest power reading: a response's `usage.energy_j` is
known when it is sent, and the tier counter gets the same figure.

Energy is attributed when the batch ends, to the tier that asked, including a job whose client
has gone: the card spent it either way.
"""

from __future__ import annotations

import bisect
import contextlib
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from meltguard.daemon.catalog import BY_NAME, PREFIX
from meltguard.values import GenerationJob, GpuSample

# Longer than any batch: SDXL at 1024x1024 in a big batch on a throttled card takes a minute.
HISTORY_S = 600.0
MAX_POINTS = 4096


@dataclass(slots=True)
class Metering:
    """One request's share, filled in when its batch ends (None: unknown)."""

    tier: str
    joules: float | None = None


class EnergyMeter:
    def __init__(self) -> None:
        self.gpu: int | None = None
        self._points: deque[tuple[float, float]] = deque(maxlen=MAX_POINTS)  # (t, joules)
        self._counter: bool | None = None  # the card's own counter (True) or integrated power
        self._power_w: float | None = None
        self._integrated = 0.0
        self._expected: dict[int, tuple[GenerationJob, Metering]] = {}
        self._tiers: dict[str, float] = {}

    @property
    def tier_joules(self) -> Mapping[str, float]:
        return dict(self._tiers)

    # ---- the card's curve -------------------------------------------------------------------

    def observe(self, samples: Sequence[GpuSample]) -> None:
        """Add the metered card's newest reading (call with every telemetry snapshot)."""
        if self.gpu is None and samples:
            self.gpu = min(s.index for s in samples)
        sample = next((s for s in samples if s.index == self.gpu), None)
        if sample is None or sample.lost:
            return
        now = sample.taken_at
        if self._points and now <= self._points[-1][0]:
            return  # the same read again (a tick without a new sample)
        if self._counter is None and (sample.energy_j is not None or sample.power_w is not None):
            self._counter = sample.energy_j is not None
        if self._counter:
            if sample.energy_j is None:
                return
            if self._points and sample.energy_j < self._points[-1][1]:
                self._points.clear()  # the driver reloaded and its counter restarted
            self._points.append((now, sample.energy_j))
        elif sample.power_w is not None:
            if self._points and self._power_w is not None:
                last_t = self._points[-1][0]
                self._integrated += (self._power_w + sample.power_w) / 2 * (now - last_t)
            self._points.append((now, self._integrated))
        if sample.power_w is not None:
            self._power_w = sample.power_w
        while self._points and self._points[0][0] < now - HISTORY_S:
            self._points.popleft()

    def joules_between(self, start: float, end: float) -> float | None:
        """The card's energy over [start, end], or None with no reading to go on."""
        first, last = self._at(start), self._at(end)
        if first is None or last is None:
            return None
        return max(last - first, 0.0)

    def _at(self, t: float) -> float | None:
        points = self._points
        if not points:
            return None
        if t >= points[-1][0]:
            return points[-1][1] + self._end_rate() * (t - points[-1][0])
        if t <= points[0][0]:
            return points[0][1] - self._start_rate() * (points[0][0] - t)
        i = bisect.bisect_right(points, t, key=lambda p: p[0])
        (t0, e0), (t1, e1) = points[i - 1], points[i]
        return e0 + (e1 - e0) * (t - t0) / (t1 - t0)

    def _end_rate(self) -> float:
        if self._power_w is not None:
            return self._power_w
        return self._slope(-2, -1)

    def _start_rate(self) -> float:
        return self._slope(0, 1)

    def _slope(self, a: int, b: int) -> float:
        if len(self._points) < 2:
            return 0.0
        (t0, e0), (t1, e1) = self._points[a], self._points[b]
        return (e1 - e0) / (t1 - t0)

    # ---- batches ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def metering(self, job: GenerationJob, tier: str) -> Iterator[Metering]:
        """Around one request's generation: the yielded Metering holds its joules once the
        batch it ran in has ended."""
        entry = Metering(tier)
        # Keyed by identity: two requests may carry equal jobs (same prompt and seed).
        self._expected[id(job)] = (job, entry)
        try:
            yield entry
        finally:
            self._expected.pop(id(job), None)

    def batch_ran(self, jobs: Sequence[GenerationJob], started: float, ended: float) -> None:
        """The engine's batch listener."""
        images = sum(job.n for job in jobs)
        joules = self.joules_between(started, ended)
        for job in jobs:
            expected = self._expected.get(id(job))
            if expected is None or expected[0] is not job:
                continue
            entry = expected[1]
            if joules is not None and images:
                share = entry.joules = joules * job.n / images
                self._tiers[entry.tier] = self._tiers.get(entry.tier, 0.0) + share


class EnergyCollector(Collector):
    def __init__(self, meter: EnergyMeter) -> None:
        self._meter = meter

    def describe(self) -> Iterable[Metric]:
        yield self._family()

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for tier, joules in sorted(self._meter.tier_joules.items()):
            family.add_metric([tier], joules)
        yield family

    @staticmethod
    def _family() -> CounterMetricFamily:
        spec = BY_NAME[PREFIX + "energy_joules"]
        return CounterMetricFamily(spec.full_name, spec.help, labels=list(spec.labels))
