"""The import graph of the farm package, imports inside functions included, has no cycle through farm.ml.

Why walk the source instead of importing: an import inside a function hides a cycle from Python until the
function runs, and then the half-initialised module fails on one path only. Only imports that run count:
an ``if TYPE_CHECKING:`` block never runs. Cycles elsewhere in farm are not checked yet (celery_app ->
gpu_pinning.bootstep -> worker -> dispatch -> celery_app is one).
"""

from __future__ import annotations

import ast
from pathlib import Path

FARM = Path(__file__).resolve().parent.parent / "farm"

#: Module -> {imported module of the same package: line of its first import}.
Graph = dict[str, dict[str, int]]


def _modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under the package folder ``root`` (a package by its __init__)."""
    out: dict[str, Path] = {}
    for file in sorted(root.rglob("*.py")):
        parts = list(file.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = file
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Collects (imported module, line) at every nesting level, relative imports resolved."""

    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.package = module.split(".") if is_package else module.split(".")[:-1]
        self.known = known
        self.found: list[tuple[str, int]] = []

    def _add(self, name: str, line: int) -> None:
        if name in self.known:
            self.found.append((name, line))

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package[: len(self.package) - (node.level - 1)]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            self._add(submodule if submodule in self.known else source, node.lineno)


def import_graph(root: Path) -> Graph:
    """Who imports whom among the modules of the package folder ``root``, at any nesting level."""
    modules = _modules(root)
    graph: Graph = {}
    for name, file in modules.items():
        visitor = _Imports(name, file.name == "__init__.py", set(modules))
        visitor.visit(ast.parse(file.read_text(encoding="utf-8"), filename=str(file)))
        edges: dict[str, int] = {}
        for target, line in visitor.found:
            if target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def knots(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module: each member reaches each other one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(components)


def cycle_in(graph: Graph, knot: list[str]) -> list[str]:
    """A shortest cycle ``[a, b, ..., a]`` through the first module of ``knot``, inside it (breadth first)."""
    component, start = set(knot), knot[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt not in component or nxt in previous:
                    continue
                previous[nxt] = node
                if nxt == start:
                    path = [start]
                    while path[-1] != start or len(path) == 1:
                        path.append(previous[path[-1]])
                    return path[::-1]
                following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def describe(graph: Graph, knot: list[str]) -> str:
    """``a (line 3) -> b (line 9) -> a``: where each import of one cycle is, then every module of the knot."""
    cycle = cycle_in(graph, knot)
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)]
    return " -> ".join([*steps, cycle[-1]]) + f" (knot: {', '.join(knot)})"


def test_farm_ml_has_no_import_cycle() -> None:
    graph = import_graph(FARM)
    assert "farm.ml.presets" in graph and graph["farm.ml.scoring"], "the walk found farm.ml's imports"
    through_ml = [k for k in knots(graph) if any(m == "farm.ml" or m.startswith("farm.ml.") for m in k)]
    assert not through_ml, "import cycles: " + "; ".join(describe(graph, k) for k in through_ml)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")


def test_a_cycle_through_an_import_inside_a_function_is_reported(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "farm/__init__.py": "",
            "farm/ml/__init__.py": "",
            "farm/ml/a.py": "from farm.ml.b import B\n",
            "farm/ml/b.py": "B = 1\n\n\ndef f():\n    from . import a\n    return a\n",
            "farm/ml/c.py": "from farm.ml import a\n",
        },
    )
    graph = import_graph(tmp_path / "farm")
    assert graph["farm.ml.b"] == {"farm.ml.a": 5} and graph["farm.ml.c"] == {"farm.ml.a": 1}
    assert knots(graph) == [["farm.ml.a", "farm.ml.b"]]
    assert describe(graph, knots(graph)[0]) == (
        "farm.ml.a (line 1) -> farm.ml.b (line 5) -> farm.ml.a (knot: farm.ml.a, farm.ml.b)"
    )


def test_relative_imports_resolve_and_type_checking_imports_do_not_count(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "farm/__init__.py": "from .ml import x\n",
            "farm/util.py": "",
            "farm/ml/__init__.py": "from . import x\n",
            "farm/ml/x.py": (
                "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from farm.ml import y\n"
                "else:\n    from .. import util\n"
            ),
            "farm/ml/y.py": "def g():\n    from ..ml.x import thing\n",
        },
    )
    graph = import_graph(tmp_path / "farm")
    assert graph == {
        "farm": {"farm.ml.x": 1},
        "farm.util": {},
        "farm.ml": {"farm.ml.x": 1},
        "farm.ml.x": {"farm.util": 6},
        "farm.ml.y": {"farm.ml.x": 2},
    }
    assert knots(graph) == []
