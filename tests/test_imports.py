"""The package's import graph has no cycle: every `dfm_cli` import counts, also the ones
inside functions (a lazy import still ties two modules into one unit of understanding)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dfm_cli"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str], root: Path = PACKAGE) -> set[str]:
    """The package modules `path` imports anywhere in its body. `from dfm_cli import x`
    names the module `dfm_cli.x` when that is a module, else the package's `__init__`."""
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = {f"{base}.{alias.name}" for alias in node.names}
            found.update(names & modules)
            if names - modules:  # a name defined in `base` itself
                found.add(base)
    # keep package modules only; an imported package implies its __init__
    return {m for m in found if m in modules and m != here}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    return {module_name(f, root): imported_modules(f, modules, root) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as `[a, b, …, a]`, or None (depth-first search with three colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "dfm_cli.data.datasets" in graph and "dfm_cli.errors" in graph["dfm_cli.data.datasets"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    pkg = tmp_path / "dfm_cli"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from dfm_cli.b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from dfm_cli import c\n")
    (pkg / "c.py").write_text("import os\n\ndef f():\n    from . import a\n")
    (pkg / "d.py").write_text("from dfm_cli import a, errors_missing\n")
    graph = import_graph(pkg)
    assert graph["dfm_cli.b"] == {"dfm_cli.c"} and graph["dfm_cli.c"] == {"dfm_cli.a"}
    assert find_cycle(graph) == ["dfm_cli.a", "dfm_cli.b", "dfm_cli.c", "dfm_cli.a"]
    (pkg / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(pkg)) is None


@pytest.mark.parametrize("edges", [{"x": {"x"}}, {"x": {"y"}, "y": {"x"}}])
def test_short_cycles(edges):
    assert find_cycle(edges)[0] == find_cycle(edges)[-1]
