"""The metric-name extractor the dashboard and rule checks rely on."""

from __future__ import annotations

import pytest

from .promql import (
    GRAFANA_BUILTINS,
    PromQLSyntaxError,
    grafana_query_expr,
    grafana_variables,
    metric_names,
    substitute_grafana,
)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ("meltguard_pressure_level", {"meltguard_pressure_level"}),
        ('meltguard_pressure_level{gpu="all"} >= 3', {"meltguard_pressure_level"}),
        ("rate(a_total[5m])", {"a_total"}),
        ("rate(a_total[$__rate_interval])", {"a_total"}),
        # label lists after by/without/on/ignoring/group_left are labels, not metrics
        (
            "histogram_quantile(0.99, sum by (job, instance, tier, le) (rate(h_bucket[5m])))",
            {"h_bucket"},
        ),
        ("sum(rate(x_total[1m])) by (tier)", {"x_total"}),
        ("sum without (instance) (x)", {"x"}),
        ("max by(le)(x)", {"x"}),
        ("a > on (job, instance, tier) b", {"a", "b"}),
        ("a * ignoring (code) group_left (tier, model) b", {"a", "b"}),
        ("a * on (job) group_left b", {"a", "b"}),
        # recording-rule names contain colons
        ("meltguard:queue_wait_seconds:p99_5m > 1", {"meltguard:queue_wait_seconds:p99_5m"}),
        # set operators, bool, offset and durations
        ("a or b unless c and d", {"a", "b", "c", "d"}),
        ("a > bool 3", {"a"}),
        ("a offset 15m", {"a"}),
        ("a offset -1h30m", {"a"}),
        ("rate(a[5m:30s])", {"a"}),
        ("a @ start()", {"a"}),
        ("a @ 1609746000", {"a"}),
        # numbers in every notation, Inf and NaN
        ("a > 1e-3 and b < 0x1F and c > .5 and d != Inf and e != NaN and f > 2.5E+3",
         {"a", "b", "c", "d", "e", "f"}),
        # label values and strings that look like metric names are not metrics
        ('a{reason!~"rate_limit_exceeded|daily_quota_exceeded", tier=~"plus|pro"}', {"a"}),
        ('label_replace(a, "dst", "$1", "src", "(.*)")', {"a"}),
        ('count_values("version", build_version)', {"build_version"}),
        ("topk(3, a)", {"a"}),
        ("quantile(0.9, a)", {"a"}),
        ('{__name__="meltguard_x", tier="free"}', {"meltguard_x"}),
        ("{__name__='single_quoted'}", {"single_quoted"}),
        ("vector(0)", set()),
        ("time() - 5", set()),
        ("# a comment with words\na  # trailing comment\n", {"a"}),
        ("a\n/\nb", {"a", "b"}),
        ('a{instance=~"$instance"}', {"a"}),
        ('a{instance=~"${instance:regex}"}', {"a"}),
        ("2 * max(a) or max(b)", {"a", "b"}),
        # a metric named like an aggregation is still a metric when not used as one
        ("sum + 1", {"sum"}),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize(
    "expr", ['a{b="c}', "rate(a[5m)", "sum by (le (a)", "sum(rate(a[1m])", "a)", '"open']
)
def test_malformed_expressions_are_errors(expr: str) -> None:
    with pytest.raises(PromQLSyntaxError):
        metric_names(expr)


def test_grafana_variable_queries() -> None:
    assert grafana_query_expr("label_values(meltguard_pressure_level, instance)") == (
        "meltguard_pressure_level"
    )
    assert grafana_query_expr('label_values(m{job="x"}, instance)') == 'm{job="x"}'
    assert grafana_query_expr("label_values(instance)") == ""
    assert grafana_query_expr("query_result(topk(1, m))") == "topk(1, m)"
    assert grafana_query_expr("m") == "m"


def test_substitute_grafana_variables() -> None:
    expr = 'rate(a{instance=~"$instance", x="${x:raw}"}[$__rate_interval]) [[old]]'
    assert grafana_variables(expr) == {"instance", "x", "__rate_interval", "old"}
    values = {**GRAFANA_BUILTINS, "instance": ".*", "x": "1", "old": "o"}
    assert substitute_grafana(expr, values) == 'rate(a{instance=~".*", x="1"}[1m]) o'
    with pytest.raises(KeyError):
        substitute_grafana("$unknown", values)
