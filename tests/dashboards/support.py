"""Loading dashboards/ as data: the dashboard's panels and queries, the rules and their names."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from meltguard.daemon.catalog import series_names

from .promql import grafana_query_expr

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
DASHBOARD_JSON = DASHBOARDS / "grafana" / "meltguard.json"
PROMETHEUS_DIR = DASHBOARDS / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
RULES_TEST = PROMETHEUS_DIR / "rules_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
METRICS_DOC = ROOT / "docs" / "metrics.md"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Panels that carry no data and so no unit.
UNITLESS_PANEL_TYPES = frozenset({"row", "text", "dashlist", "news", "alertlist"})

ALERTS = (
    "MeltguardGpuNearSlowdown",
    "MeltguardPressureCritical",
    "MeltguardTelemetryStale",
    "MeltguardTelemetrySimulatedFallback",
    "MeltguardPolicyReloadFailing",
    "MeltguardPaidTierRejections",
    "MeltguardQueueWaitOverBudget",
    "MeltguardQuotaStoreFailingOpen",
    "MeltguardQuotaRefundsStuck",
    "MeltguardPowerLeverRefused",
)


@dataclass(frozen=True, slots=True)
class Query:
    """One PromQL expression of the dashboard, where it lives and what it is for."""

    where: str  # "panel 3 'GPU temperature...' target B", "variable instance", ...
    expr: str
    panel_id: int | None = None
    panel_title: str = ""


@cache
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    return data


def iter_panels(panels: list[dict[str, Any]] | None = None) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard()["panels"] if panels is None else panels:
        yield panel
        yield from iter_panels(panel.get("panels") or [])


def dashboard_queries() -> list[Query]:
    queries = []
    for panel in iter_panels():
        for target in panel.get("targets", []):
            queries.append(Query(
                f"panel {panel['id']} {panel.get('title', '')!r} target {target.get('refId')}",
                target.get("expr", ""), panel["id"], panel.get("title", ""),
            ))
    for annotation in dashboard().get("annotations", {}).get("list", []):
        if annotation.get("datasource", {}).get("type") == "prometheus":
            queries.append(Query(f"annotation {annotation['name']!r}", annotation.get("expr", "")))
    for variable in dashboard().get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, dict) else query
            queries.append(Query(f"variable {variable['name']}", grafana_query_expr(text)))
    return queries


@cache
def rules_doc() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return data


def rules() -> list[dict[str, Any]]:
    return [rule for group in rules_doc()["groups"] for rule in group["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def recording_rule_names() -> frozenset[str]:
    return frozenset(rule["record"] for rule in rules() if "record" in rule)


def allowed_series() -> frozenset[str]:
    """What a dashboard or rule expression may name: catalogued series and recording rules."""
    return series_names() | recording_rule_names()


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def runbook_sections() -> dict[str, str]:
    """Anchor of every `## ` section of docs/runbook.md -> its text."""
    sections: dict[str, str] = {}
    current: str | None = None
    for line in RUNBOOK.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            current = github_anchor(line[3:])
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections
