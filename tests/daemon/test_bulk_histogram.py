"""BulkHistogram exposes what prometheus_client's Histogram would for the same observations,
however they are grouped."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from meltguard.daemon.bulk_histogram import BulkHistogram

BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")  # prometheus_client's own extra series
    }


def _pair() -> tuple[CollectorRegistry, Histogram, CollectorRegistry, BulkHistogram]:
    stock_registry, bulk_registry = CollectorRegistry(), CollectorRegistry()
    stock = Histogram("wait_seconds", "Waits.", ["tier"], buckets=BUCKETS,
                      registry=stock_registry)
    bulk = BulkHistogram("wait_seconds", "Waits.", ["tier"], BUCKETS)
    bulk_registry.register(bulk)
    return stock_registry, stock, bulk_registry, bulk


@given(st.lists(st.tuples(st.sampled_from(["free", "pro"]),
                          st.sampled_from([0.0, *BUCKETS, 0.3, 7.0, 61.0, 1e6]),
                          st.integers(min_value=1, max_value=5)), max_size=20))
def test_bulk_adds_read_as_one_observe_each(adds: list[tuple[str, float, int]]) -> None:
    stock_registry, stock, bulk_registry, bulk = _pair()
    for tier, value, count in adds:
        for _ in range(count):
            stock.labels(tier).observe(value)
        bulk.add((tier,), value, count)
    assert _samples(bulk_registry) == pytest.approx(_samples(stock_registry))


def test_a_value_on_a_bound_counts_in_that_bucket() -> None:
    registry = CollectorRegistry()
    bulk = BulkHistogram("wait_seconds", "Waits.", ["tier"], BUCKETS)
    registry.register(bulk)
    bulk.add(("pro",), 0.5, 3)
    assert registry.get_sample_value("wait_seconds_bucket", {"tier": "pro", "le": "0.25"}) == 0
    assert registry.get_sample_value("wait_seconds_bucket", {"tier": "pro", "le": "0.5"}) == 3
    assert registry.get_sample_value("wait_seconds_bucket", {"tier": "pro", "le": "+Inf"}) == 3
    assert registry.get_sample_value("wait_seconds_count", {"tier": "pro"}) == 3
    assert registry.get_sample_value("wait_seconds_sum", {"tier": "pro"}) == 1.5


def test_labels_creates_a_zero_series_and_checks_the_label_count() -> None:
    registry = CollectorRegistry()
    bulk = BulkHistogram("wait_seconds", "Waits.", ["tier"], BUCKETS)
    registry.register(bulk)
    bulk.labels("free")
    assert registry.get_sample_value("wait_seconds_count", {"tier": "free"}) == 0
    assert registry.get_sample_value("wait_seconds_bucket", {"tier": "free", "le": "+Inf"}) == 0
    with pytest.raises(ValueError, match="expected labels"):
        bulk.add(("free", "extra"), 1.0)


def test_the_name_is_claimed_in_the_registry() -> None:
    registry = CollectorRegistry()
    registry.register(BulkHistogram("wait_seconds", "Waits.", ["tier"], BUCKETS))
    with pytest.raises(ValueError, match="Duplicated"):
        Histogram("wait_seconds", "Waits.", ["tier"], registry=registry)
