"""DESIGN.md's import rules, checked on the source: data flows one way and admission/ is pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "meltguard"
IO_LIBRARIES = {"aiohttp", "prometheus_client", "structlog", "pynvml", "torch", "diffusers",
                "transformers", "redis", "yaml"}
RULES = {
    "admission": IO_LIBRARIES | {"meltguard.daemon", "meltguard.inference"},
    "inference": {"aiohttp", "prometheus_client", "pynvml", "redis",
                  "meltguard.daemon", "meltguard.admission"},
}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _violations(package: str) -> list[str]:
    forbidden = RULES[package]
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imported_modules(path):
            if any(name == bad or name.startswith(bad + ".") for bad in forbidden):
                found.append(f"{path.relative_to(ROOT.parent)} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_keeps_its_import_rules(package: str) -> None:
    assert _violations(package) == []


def test_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom meltguard.daemon import app\n")
    assert imported_modules(bad) == {"torch", "meltguard.daemon"}
