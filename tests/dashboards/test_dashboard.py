"""The Grafana dashboard as data: importable, one data source variable, real metrics only."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import yaml

from meltguard.daemon.catalog import CATALOG

from .promql import GRAFANA_BUILTINS, grafana_variables, metric_names
from .support import (
    DASHBOARD_JSON,
    DASHBOARDS,
    DATASOURCE,
    UNITLESS_PANEL_TYPES,
    allowed_series,
    dashboard,
    dashboard_queries,
    iter_panels,
    recording_rule_names,
    rules,
)

ROWS = (
    "Is the GPU hot?",
    "Who is being refused and why?",
    "Are paying users fine?",
    "Is meltguard itself healthy?",
    "What is the power lever doing, and what does an image cost?",
)


def _panel_label(panel: dict[str, Any]) -> str:
    return f"panel {panel.get('id')} {panel.get('title', '')!r}"


def test_is_valid_json_with_fixed_uid_and_current_schema() -> None:
    data = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    assert data["uid"] == "meltguard"
    assert data["schemaVersion"] >= 39
    assert data["title"]
    # Importable anywhere: no instance-specific numeric id.
    assert data.get("id") is None


def test_datasource_variable() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert "datasource" in variables
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_every_variable_query_uses_the_datasource_variable() -> None:
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


def test_panel_ids_are_unique() -> None:
    ids = Counter(panel.get("id") for panel in iter_panels())
    assert None not in ids, "a panel has no id"
    assert [pid for pid, n in ids.items() if n > 1] == []


def test_every_panel_and_target_uses_the_datasource_variable() -> None:
    for panel in iter_panels():
        assert panel.get("datasource") == DATASOURCE, _panel_label(panel)
        for target in panel.get("targets", []):
            assert target.get("datasource") == DATASOURCE, (
                f"{_panel_label(panel)} target {target.get('refId')}"
            )
    for annotation in dashboard()["annotations"]["list"]:
        if not annotation.get("builtIn"):
            assert annotation["datasource"] == DATASOURCE, annotation["name"]


def test_every_data_panel_has_a_unit() -> None:
    for panel in iter_panels():
        if panel["type"] in UNITLESS_PANEL_TYPES:
            continue
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert unit, f"{_panel_label(panel)} has no fieldConfig.defaults.unit"


def test_every_data_panel_has_targets_with_unique_ref_ids() -> None:
    for panel in iter_panels():
        if panel["type"] in UNITLESS_PANEL_TYPES:
            continue
        ref_ids = [target.get("refId") for target in panel.get("targets", [])]
        assert ref_ids, f"{_panel_label(panel)} has no query"
        assert len(set(ref_ids)) == len(ref_ids), _panel_label(panel)


def test_rows_answer_the_incident_questions_in_order() -> None:
    rows = [panel["title"] for panel in dashboard()["panels"] if panel["type"] == "row"]
    assert tuple(rows) == ROWS


def test_panels_do_not_overlap_and_fit_the_grid() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in iter_panels():
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, _panel_label(panel)
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                other = cells.setdefault((x, y), _panel_label(panel))
                assert other == _panel_label(panel), f"{other} overlaps {_panel_label(panel)}"


def test_every_expression_names_only_catalogued_metrics_or_recording_rules() -> None:
    allowed = allowed_series()
    unknown = {
        query.where: sorted(metric_names(query.expr) - allowed) for query in dashboard_queries()
    }
    assert {where: names for where, names in unknown.items() if names} == {}


def test_every_expression_reads_some_metric() -> None:
    for query in dashboard_queries():
        assert metric_names(query.expr), f"{query.where}: {query.expr!r} reads no metric"


def test_every_variable_used_is_defined() -> None:
    defined = {v["name"] for v in dashboard()["templating"]["list"]} | set(GRAFANA_BUILTINS)
    for query in dashboard_queries():
        assert grafana_variables(query.expr) <= defined, query.where


def test_every_recording_rule_is_used_by_the_dashboard_or_an_alert() -> None:
    used: set[str] = set()
    for query in dashboard_queries():
        used |= metric_names(query.expr)
    for rule in rules():
        used |= metric_names(rule["expr"])
    assert sorted(recording_rule_names() - used) == []


def test_every_catalogued_metric_is_shown_or_alerted_on() -> None:
    """A metric nobody looks at is a metric nobody notices breaking."""
    reads = {rule["record"]: metric_names(rule["expr"]) for rule in rules() if "record" in rule}
    used: set[str] = set()
    for query in dashboard_queries():
        used |= metric_names(query.expr)
    for rule in rules():
        used |= metric_names(rule["expr"])
    for name in list(used):  # what the recording rules used here read
        used |= reads.get(name, set())
    unused = [spec.full_name for spec in CATALOG
              if not used & {n for n in spec.exported_names if not n.endswith("_created")}]
    assert unused == []


def _panel(title_start: str) -> dict[str, Any]:
    matches = [p for p in iter_panels() if p.get("title", "").startswith(title_start)]
    assert len(matches) == 1, f"expected one panel titled {title_start!r}, got {len(matches)}"
    return matches[0]


def _mapped_texts(panel: dict[str, Any]) -> set[str]:
    texts = set()
    for mapping in panel["fieldConfig"]["defaults"].get("mappings", []):
        for option in mapping.get("options", {}).values():
            texts.add(option.get("text", ""))
    return texts


def test_policy_mode_is_a_coloured_stat_that_shouts_shadow() -> None:
    panel = _panel("Policy mode")
    assert panel["type"] == "stat"
    assert panel["options"]["colorMode"] in ("background", "value")
    assert any(text.startswith("SHADOW") for text in _mapped_texts(panel))
    assert any(text.startswith("ENFORCE") for text in _mapped_texts(panel))
    expr = panel["targets"][0]["expr"]
    assert 'mode="shadow"' in expr and "meltguard_policy_info" in expr


def test_pressure_panels_name_the_levels() -> None:
    for title in ("Pressure level now", "Pressure level over time"):
        assert {"normal", "elevated", "high", "critical"} <= _mapped_texts(_panel(title)), title


@pytest.mark.parametrize(
    ("title", "metrics"),
    [
        ("GPU temperature", {"meltguard_gpu_temperature_celsius",
                             "meltguard_gpu_slowdown_temperature_celsius",
                             "meltguard_pressure_enter_temperature_celsius"}),
        ("GPU power vs limit", {"meltguard_gpu_power_watts", "meltguard_gpu_power_limit_watts"}),
        ("Queue wait p50 / p99", {"meltguard:queue_wait_seconds:p50_5m",
                                  "meltguard:queue_wait_seconds:p99_5m",
                                  "meltguard_queue_wait_budget_seconds"}),
        ("Active throttle reasons", {"meltguard_gpu_throttle_active"}),
        ("Telemetry source", {"meltguard_telemetry_source_info"}),
        ("Concurrency limit", {"meltguard_concurrency_limit", "meltguard_inflight_requests"}),
        ("Power limit in force vs draw", {"meltguard_gpu_power_watts",
                                          "meltguard_gpu_power_limit_watts"}),
        ("Power-limit changes", {"meltguard_power_limit_changes_total"}),
        ("Energy per image by tier", {"meltguard_energy_joules_total",
                                      "meltguard_images_generated_total"}),
    ],
)
def test_key_panels_compare_what_they_promise(title: str, metrics: set[str]) -> None:
    names: set[str] = set()
    for target in _panel(title)["targets"]:
        names |= metric_names(target["expr"])
    assert metrics <= names


# ---------------------------------------------------------------- provisioning and compose


def _yaml(relative: str) -> Any:
    return yaml.safe_load((DASHBOARDS / relative).read_text(encoding="utf-8"))


def test_datasource_provisioning() -> None:
    doc = _yaml("grafana/provisioning/datasources/datasource.yml")
    assert doc["apiVersion"] == 1
    (source,) = doc["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"


def test_dashboard_provisioning_path_matches_the_compose_mount() -> None:
    provider = _yaml("grafana/provisioning/dashboards/dashboards.yml")["providers"][0]
    assert provider["type"] == "file"
    compose = _yaml("docker-compose.yml")
    grafana = compose["services"]["grafana"]
    mounts = dict(volume.split(":")[:2][::-1] for volume in grafana["volumes"])
    dashboards_dir = provider["options"]["path"]
    host = mounts.get(dashboards_dir) or mounts.get(f"{dashboards_dir}/meltguard.json")
    assert host in ("./grafana", "./grafana/meltguard.json"), mounts
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"


def test_compose_runs_meltguard_prometheus_and_grafana() -> None:
    services = _yaml("docker-compose.yml")["services"]
    assert set(services) >= {"meltguard", "prometheus", "grafana"}
    meltguard = services["meltguard"]
    assert meltguard["build"]["context"] == ".."
    assert meltguard["command"] == [
        "meltguard", "serve", "--host", "0.0.0.0", "--model", "sim", "--telemetry", "auto",
    ]
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    prom_mounts = dict(v.split(":")[:2][::-1] for v in services["prometheus"]["volumes"])
    assert prom_mounts["/etc/prometheus"] == "./prometheus"
    assert (DASHBOARDS / "prometheus" / "prometheus.yml").is_file()
    scrape = _yaml("prometheus/prometheus.yml")["scrape_configs"][0]
    assert scrape["job_name"] == "meltguard"
    assert scrape["static_configs"][0]["targets"] == ["meltguard:8000"]
