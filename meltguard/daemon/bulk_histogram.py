"""A labelled Prometheus histogram that takes its observations in bulk.

The queue-wait histogram gets one observation per admission, and nearly all of them are the
same value: zero, a slot was free. prometheus_client's Histogram takes them one `observe` at a
time (a lock for the sum and one for the bucket, each call); this one adds a loop turn's
observations in one step per distinct value (`add(labels, value, count)`). It is read at
scrape time, as the scrape-time gauges are, and exposes what a Histogram would: `_bucket`
(cumulative, `le` formatted as prometheus_client formats it), `_count` and `_sum`.
Single-threaded: the daemon scrapes on its event loop.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterable, Sequence

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# How prometheus_client writes a bucket's `le` ("0.005", "1.0", "+Inf"); typed here.
_go_string: Callable[[float], str] = floatToGoString


class _Series:
    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets  # per bucket, not cumulative
        self.total = 0.0


class BulkHistogram(Collector):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float]) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = tuple(bounds)
        self._le = tuple(_go_string(b) for b in bounds)
        self._series: dict[tuple[str, ...], _Series] = {}

    def labels(self, *values: str) -> None:
        """Create the series at zero, so dashboards and rate() see it from the start."""
        self._get(values)

    def add(self, values: tuple[str, ...], observed: float, count: int = 1) -> None:
        """`count` observations of `observed` for the series with these label values."""
        series = self._series.get(values) or self._get(values)
        # Bucket i counts values up to bounds[i] inclusive ("le"): the first bound >= observed.
        series.counts[bisect.bisect_left(self._bounds, observed)] += count
        series.total += observed * count

    def _get(self, values: tuple[str, ...]) -> _Series:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected labels {self._labelnames}, got {values}")
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = _Series(len(self._bounds))
        return series

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation,
                                       labels=self._labelnames)
        for values, series in self._series.items():
            cumulative = itertools.accumulate(series.counts)
            family.add_metric(list(values), list(zip(self._le, cumulative, strict=True)),
                              series.total)
        yield family

    def describe(self) -> Iterable[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
