"""Prometheus rules: promtool accepts and unit-tests them; they name only real metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .promql import metric_names
from .support import (
    ALERTS,
    PROMETHEUS_CONFIG,
    RULES,
    RULES_TEST,
    alert_rules,
    allowed_series,
    recording_rule_names,
    rules,
    rules_doc,
    runbook_sections,
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (Debian: apt-get install --no-install-recommends prometheus)",
)


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


@needs_promtool
def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_config_resolves_rules_relative_to_the_config(tmp_path: Path) -> None:
    # Run from elsewhere: rule_files must resolve against the config file's directory.
    result = _promtool("check", "config", str(PROMETHEUS_CONFIG), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "1 rule files found" in output, output
    assert str(RULES.name) in output, output


@needs_promtool
def test_promtool_test_rules() -> None:
    result = _promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_expected_alerts_exist() -> None:
    assert sorted(rule["alert"] for rule in alert_rules()) == sorted(ALERTS)


def test_rule_names_are_unique() -> None:
    names = [rule.get("record") or rule.get("alert") for rule in rules()]
    assert len(names) == len(set(names))


def test_recording_rules_follow_the_level_metric_operation_convention() -> None:
    for name in recording_rule_names():
        assert re.fullmatch(r"meltguard:[a-z0-9_]+:[a-z0-9_]+", name), name


def test_recording_rules_come_before_the_rules_that_use_them() -> None:
    # Groups run concurrently in Prometheus, but a rule reading a recording rule of a later group
    # would read the previous evaluation at best; keep recordings first.
    defined: set[str] = set()
    recordings = recording_rule_names()
    for group in rules_doc()["groups"]:
        for rule in group["rules"]:
            used = metric_names(rule["expr"]) & recordings
            assert used <= defined, f"{rule.get('alert') or rule.get('record')} uses {used}"
            if "record" in rule:
                defined.add(rule["record"])


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r.get("alert") or r.get("record"))
def test_rule_expression_names_only_catalogued_metrics_or_recording_rules(
    rule: dict[str, Any],
) -> None:
    names = metric_names(rule["expr"])
    assert names, f"{rule['expr']!r} reads no metric"
    assert sorted(names - allowed_series()) == []


@pytest.mark.parametrize("alert", alert_rules(), ids=lambda r: r["alert"])
def test_alert_has_severity_summary_description_and_runbook(alert: dict[str, Any]) -> None:
    assert alert["labels"]["severity"] in ("critical", "warning", "info")
    annotations = alert["annotations"]
    assert annotations["summary"].strip()
    assert annotations["description"].strip()
    url = annotations["runbook_url"]
    assert url == f"docs/runbook.md#{alert['alert'].lower()}"
    anchor = url.split("#", 1)[1]
    assert anchor in runbook_sections(), f"docs/runbook.md has no section for #{anchor}"


def test_every_alert_both_fires_and_stays_silent_in_rules_test() -> None:
    doc = yaml.safe_load(RULES_TEST.read_text(encoding="utf-8"))
    assert doc["rule_files"] == [RULES.name]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    assert sorted(set(ALERTS) - fires) == [], "alerts never expected to fire"
    assert sorted(set(ALERTS) - silent) == [], "alerts never expected to stay silent"
