"""Layering of the source tree, read from the files (every import, function-local ones included):
no import cycle between files, ``verifiers/`` and ``tasks/`` use ``grpo`` only through its leaf
services, and no source file past one sitting's read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("grpo", "verifiers", "tasks")
MAX_LINES = 800
LEAF_SERVICES = {"grpo.errors", "grpo.registry"}  # what verifiers/ and tasks/ may import from grpo


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _module_files()


def _imported_modules(path: Path, module: str) -> set[str]:
    """Every module of the three packages that ``path`` imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from grpo import checkpoint`
    return {name for name in found if name in MODULES}


GRAPH = {name: _imported_modules(path, name) - {name} for name, path in MODULES.items()}


def _rel(name: str) -> str:
    return MODULES[name].relative_to(REPO).as_posix()


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_reader_sees_every_kind_of_import():
    # the checker itself can break: Tarjan on a hand-made graph, and imports read from real files
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": set()}
    assert _cycles(graph) == [frozenset({"a", "b", "c"})]
    assert "grpo.errors" in GRAPH["grpo.config"]  # a top-level import
    assert "grpo.config" in GRAPH["grpo.cli"]  # imported inside a function
    assert "grpo.checkpoint" in GRAPH["grpo.training"]  # `from grpo import checkpoint`
    assert "grpo.rm.model" in GRAPH["grpo.rm.verifier"]  # function-local, in a subpackage


def test_no_import_cycles_between_files():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(_rel(m) for m in c)) for c in cycles)


@pytest.mark.parametrize("package", ["verifiers", "tasks"])
def test_verifiers_and_tasks_use_grpo_only_through_leaf_services(package):
    bad = {f"{_rel(name)} imports {target}" for name, targets in GRAPH.items()
           if name.split(".")[0] == package for target in targets
           if target.split(".")[0] == "grpo" and target not in LEAF_SERVICES}
    assert not bad, sorted(bad)


def _line_counts() -> dict[str, int]:
    return {_rel(name): len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}


def test_no_source_file_over_the_limit():
    long = {f: n for f, n in _line_counts().items() if n > MAX_LINES}
    assert not long, f"split these along their concerns (> {MAX_LINES} lines): {long}"
