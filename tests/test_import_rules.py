"""DESIGN.md's import rules, checked on the source of every package: data flows one way,
admission/ is pure, and no package or module imports itself back through another."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOT = REPO / "meltguard"
IO_LIBRARIES = {"aiohttp", "prometheus_client", "structlog", "pynvml", "torch", "diffusers",
                "transformers", "redis", "yaml", "orjson", "uvloop"}
# The shared vocabulary every layer may use: values, errors, Protocols, clocks.
CORE = ("meltguard.values", "meltguard.errors", "meltguard.protocols", "meltguard.clock")
# Layers, lowest first: a layer may import the ones before it, never one after it. The
# command line (meltguard.cli, meltguard.__main__) sits on top of them all.
LAYERS = ("core", "admission", "inference", "daemon", "bench", "cli")
# Besides the layer order: admission/ is pure (stdlib and pydantic), inference/ never sees
# the gate or the daemon's I/O, and the core is stdlib only.
FORBIDDEN = {
    "core": IO_LIBRARIES | {"pydantic"},
    "admission": IO_LIBRARIES | {"meltguard.inference"},
    "inference": {"aiohttp", "prometheus_client", "pynvml", "redis", "meltguard.admission"},
}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from meltguard.admission import gate` imports the module meltguard.admission.gate
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(path): path for path in sorted(root.rglob("*.py"))}


MODULES = sources()


def layer_of(module: str) -> str | None:
    """The layer of a meltguard module, None for anything else."""
    if module in CORE or module == "meltguard":
        return "core"
    if module in ("meltguard.cli", "meltguard.__main__"):
        return "cli"
    parts = module.split(".")
    if parts[0] != "meltguard" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def _ours(name: str) -> str | None:
    """The meltguard module an import names (a `from x import y` may name a function)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports_of(path: Path) -> set[str]:
    """The meltguard modules `path` imports. `from pkg import sub` imports the module
    pkg.sub, not what pkg/__init__.py holds."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(filter(None, (_ours(alias.name) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                target = sub if sub in MODULES else _ours(node.module)
                if target is not None:
                    found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    return {module: _imports_of(path) - {module} for module, path in MODULES.items()}


def cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one node (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def test_every_module_belongs_to_a_layer() -> None:
    assert [m for m in MODULES if layer_of(m) is None] == []


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    wrong = []
    for module, targets in graph().items():
        if layer_of(module) != layer:
            continue
        wrong += [f"{module} imports {t}" for t in sorted(targets) if layer_of(t) not in allowed]
    assert wrong == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_keeps_its_library_rules(layer: str) -> None:
    forbidden = FORBIDDEN[layer]
    wrong = []
    for module, path in MODULES.items():
        if layer_of(module) != layer:
            continue
        wrong += [f"{module} imports {name}" for name in sorted(imported_modules(path))
                  if any(name == bad or name.startswith(bad + ".") for bad in forbidden)]
    assert wrong == []


def test_inference_never_sees_the_gate_or_the_daemon() -> None:
    edges = graph()
    for module, targets in edges.items():
        if layer_of(module) == "inference":
            assert not {t for t in targets if layer_of(t) in ("admission", "daemon")}, module


def test_no_package_imports_itself_back() -> None:
    packages: dict[str, set[str]] = {}
    for module, targets in graph().items():
        source = layer_of(module)
        assert source is not None
        packages.setdefault(source, set()).update(
            layer for layer in map(layer_of, targets) if layer and layer != source)
    assert cycles(packages) == []


def test_no_module_imports_itself_back() -> None:
    assert cycles(graph()) == []


def test_meltguard_never_imports_the_benchmarks() -> None:
    wrong = [f"{module} imports {name}" for module, path in MODULES.items()
             for name in imported_modules(path) if name.split(".")[0] == "benchmarks"]
    assert wrong == []


def test_the_checks_see_a_violation_and_a_cycle(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nfrom meltguard.daemon import app\n")
    assert imported_modules(bad) == {"torch", "meltguard.daemon", "meltguard.daemon.app"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("meltguard.daemon.app") == "daemon" and layer_of("meltguard.errors") == "core"
