"""docs/metrics.md is generated from the catalogue; docs/runbook.md covers every alert."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meltguard.daemon import catalog_docs
from meltguard.daemon.catalog import CATALOG, MetricSpec

from .support import ALERTS, METRICS_DOC, ROOT, runbook_sections


def test_metrics_doc_is_up_to_date() -> None:
    committed = METRICS_DOC.read_text(encoding="utf-8")
    assert committed == catalog_docs.render(), (
        f"docs/metrics.md is out of date; regenerate it with: {catalog_docs.REGENERATE}"
    )


def test_metrics_doc_lists_every_metric_with_its_query_name() -> None:
    text = catalog_docs.render()
    for spec in CATALOG:
        assert f"`{catalog_docs.query_name(spec)}" in text, spec.name
        assert spec.help.split(":")[0] in text


def test_module_prints_the_reference() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meltguard.daemon.catalog_docs"],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=True,
    )
    assert result.stdout == catalog_docs.render()


def test_main_rejects_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert catalog_docs.main(["extra"]) == 2
    assert catalog_docs.REGENERATE in capsys.readouterr().err


def test_undocumented_label_is_refused() -> None:
    spec = MetricSpec("x", "gauge", ("colour",), "ratio", "A test metric.")
    with pytest.raises(ValueError, match="colour"):
        catalog_docs.render([spec])


def test_table_cells_are_escaped() -> None:
    spec = MetricSpec("x", "gauge", (), "ratio", "a | b")
    assert "a \\| b" in catalog_docs.render([spec])


@pytest.mark.parametrize("alert", ALERTS)
def test_runbook_section_per_alert(alert: str) -> None:
    sections = runbook_sections()
    assert alert.lower() in sections, f"docs/runbook.md has no '## {alert}' section"
    text = sections[alert.lower()]
    for part in ("What it means", "First checks", "Mitigations"):
        assert part in text, f"{alert}: no '{part}'"
