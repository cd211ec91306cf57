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
                return path[path.index(nxt) :] + [nxt]
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


# The package's layers, lowest first. A module may import its own layer and the layers below
# it, never one above: the data layer knows nothing of training, the method nothing of files.
LAYERS: list[tuple[str, ...]] = [
    (
        "dfm_cli",
        "dfm_cli.errors",
        "dfm_cli.seeding",
        "dfm_cli.media",
        "dfm_cli.listing",
        "dfm_cli.distributed",
        "dfm_cli.progress",
    ),
    ("dfm_cli.method",),
    ("dfm_cli.models",),
    ("dfm_cli.baselines",),
    ("dfm_cli.data",),
    ("dfm_cli.evaluation",),
    ("dfm_cli.config",),
    ("dfm_cli.methods",),
    ("dfm_cli.sampling",),
    ("dfm_cli.training",),
    ("dfm_cli.ablate",),
    ("dfm_cli.commands", "dfm_cli.cli", "dfm_cli.__main__", "dfm_cli.api"),  # the entry points: CLI and Python
]


def layer_of(module: str) -> int:
    """The index in `LAYERS` of the longest prefix that names `module` or a package above it."""
    best, depth = -1, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and name.count(".") > depth:
                best, depth = i, name.count(".")
    if best < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_imports.py")
    return best


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} (layer {LAYERS[layer_of(m)][0]}) imports {dep} (layer {LAYERS[layer_of(dep)][0]})"
        for m, deps in graph.items()
        for dep in deps
        if layer_of(dep) > layer_of(m)
    )


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_layer_imports_a_layer_above_it():
    bad = upward_imports(import_graph())
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    pkg = tmp_path / "dfm_cli"
    for folder in ("method", "training"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "training" / "loop.py").write_text("from dfm_cli.method.flow import x\n")
    (pkg / "method" / "flow.py").write_text("x = 1\n")
    assert upward_imports(import_graph(pkg)) == []
    (pkg / "method" / "flow.py").write_text("def f():\n    from dfm_cli.training import loop\n")
    assert upward_imports(import_graph(pkg)) == [
        "dfm_cli.method.flow (layer dfm_cli.method) imports dfm_cli.training.loop (layer dfm_cli.training)"
    ]


def test_old_module_paths_give_the_moved_modules():
    """Scripts written against the flat package keep working: an old path is the new module."""
    import importlib

    import dfm_cli

    for old, new in dfm_cli.MOVED.items():
        assert importlib.import_module(f"dfm_cli.{old}") is importlib.import_module(f"dfm_cli.{new}"), old
    from dfm_cli.data import build_dataset  # the datasets module was `dfm_cli.data`
    from dfm_cli.data.datasets import build_dataset as moved

    assert build_dataset is moved
    # and in a fresh interpreter, where nothing has imported the datasets module yet
    import subprocess
    import sys

    fresh = subprocess.run(
        [sys.executable, "-c", "from dfm_cli.data import build_dataset; import dfm_cli.train as t; print(t.__name__)"],
        capture_output=True,
        text=True,
    )
    assert fresh.returncode == 0 and fresh.stdout.strip() == "dfm_cli.training.loop", fresh.stderr
