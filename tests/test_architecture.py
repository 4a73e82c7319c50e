"""House rules that tools can check (see the README's layout section): function and module length, import
direction, no import cycle, one place for mlflow, one script entry point. Static: the sources are parsed, not run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("medseg", "pipelines")
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the two import packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for name, path in MODULES.items()}


def _imports(name: str, tree: ast.Module) -> set[str]:
    """Every module ``name`` imports anywhere (top level, inside functions, under TYPE_CHECKING).

    ``from a.b import c`` counts as importing ``a.b.c`` when that is a module, else ``a.b``.
    """
    is_package = MODULES[name].name == "__init__.py"
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in MODULES else base)
    return targets


GRAPH = {name: {t for t in _imports(name, tree) if t in MODULES and t != name} for name, tree in TREES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_modules():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_is_longer_than_80_lines():
    long = [
        f"{MODULES[name].relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert long == []


def test_a_module_over_450_lines_says_why_in_its_first_line():
    unexplained = []
    for path in MODULES.values():
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > MAX_MODULE_LINES and not lines[0].startswith("# "):
            unexplained.append(f"{path.relative_to(ROOT)} ({len(lines)} lines)")
    assert unexplained == []


def test_imports_point_down():
    upward = [f"{name} imports {target}" for name, targets in GRAPH.items() if name.startswith("medseg")
              for target in targets if target.startswith("pipelines")]
    assert upward == []


@pytest.mark.parametrize("package", ["mlflow"])
def test_one_package_alone_imports_mlflow(package):
    users = sorted(
        name for name, tree in TREES.items()
        if any(t == package or t.startswith(f"{package}.") for t in _imports(name, tree))
    )
    assert users and all(name.startswith("medseg.tracking") for name in users), users


def test_one_entry_module_runs_as_a_script():
    """``python -m pipelines`` alone: a module run as ``__main__`` and imported by name would run twice."""
    scripts = sorted(
        name for name, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) and "__name__" in ast.unparse(node.test)
    )
    assert scripts == []
    assert "pipelines.__main__" in MODULES


LAYERS = ("medseg.nets", "medseg.transforms", "medseg.losses", "medseg.data", "medseg.metrics")


def _layer(module: str) -> str | None:
    return next((layer for layer in LAYERS if module == layer or module.startswith(f"{layer}.")), None)


def test_building_blocks_do_not_import_each_other_or_draw():
    """nets, transforms, losses, data and metrics are side by side; pictures are the pipelines' job."""
    crossing = sorted(
        f"{name} imports {target}" for name, targets in GRAPH.items() if _layer(name)
        for target in targets
        if (_layer(target) and _layer(target) != _layer(name)) or target == "medseg.visualize"
    )
    assert crossing == []
