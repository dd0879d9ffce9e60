"""The first-party imports form no circle: every module under analysis/, storage_schemas/, tasks/, flows/ and
effattn.py is parsed (imports at module level and inside functions alike; those under `if TYPE_CHECKING:` are
never run and are left out), and the graph of which module imports which must have no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("analysis", "storage_schemas", "tasks", "flows")
TOP_LEVEL_MODULES = ("effattn",)


def first_party_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of PACKAGES (package `__init__` files included) and
    TOP_LEVEL_MODULES."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for name in TOP_LEVEL_MODULES:
        if (root / f"{name}.py").is_file():
            modules[name] = root / f"{name}.py"
    return modules


def _is_type_checking_block(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, outside `if TYPE_CHECKING:` blocks."""
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking_block(child):
                pending.extend(child.orelse)  # the `else:` branch does run
                continue
            pending.append(child)


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The first-party modules (of `known`) that `module` (at `path`) imports."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # a relative import
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from package import module` imports the module; `from module import name` the module itself
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for candidate in candidates:
            while candidate and candidate not in known:  # `import a.b.c` of a non-module name: its nearest module
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != module:
                found.add(candidate)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = first_party_modules(root)
    return {module: imported_modules(module, path, set(modules)) for module, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) through every strongly connected group of modules that import each other
    (Tarjan's algorithm, iterative), sorted."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = lowlink[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = lowlink[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    lowlink[node] = min(lowlink[node], index[child])
                continue
            work.pop()
            if work:
                lowlink[work[-1][0]] = min(lowlink[work[-1][0]], lowlink[node])
            if lowlink[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return sorted(_cycle_within(graph, set(group)) for group in groups)


def _cycle_within(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest cycle through the first module of `group` (breadth-first), as [a, b, ..., a]."""
    start = min(group)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & group):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle within {sorted(group)}")


def test_the_first_party_modules_import_each_other_without_a_circle():
    graph = import_graph()
    assert "storage_schemas.results_dataset" in graph and "effattn" in graph  # the walk found the modules
    cycles = import_cycles(graph)
    assert not cycles, "import circles (module -> module it imports):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_the_storage_errors_live_in_a_leaf_module():
    assert import_graph()["storage_schemas.errors"] == set()


def test_imports_inside_functions_and_every_import_form_are_seen(tmp_path):
    (tmp_path / "analysis").mkdir()
    for package in PACKAGES[1:]:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "analysis" / "__init__.py").write_text("")
    (tmp_path / "analysis" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nimport numpy\n"
        "if TYPE_CHECKING:\n    from analysis import c\n"
        "def f():\n    from analysis.b import g\n"
    )
    (tmp_path / "analysis" / "b.py").write_text("from . import c\n")
    (tmp_path / "analysis" / "c.py").write_text("import analysis.a\n")
    (tmp_path / "effattn.py").write_text("from analysis import a\nfrom storage_schemas import missing\n")
    graph = import_graph(tmp_path)
    assert graph["analysis.a"] == {"analysis.b"}  # numpy and the TYPE_CHECKING import are left out
    assert graph["analysis.b"] == {"analysis.c"} and graph["analysis.c"] == {"analysis.a"}
    assert graph["effattn"] == {"analysis.a", "storage_schemas"}
    assert import_cycles(graph) == [["analysis.a", "analysis.b", "analysis.c", "analysis.a"]]


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b", "a"]]),
        ({"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"e"}, "e": {"d"}}, [["a", "b", "a"], ["d", "e", "d"]]),
    ],
)
def test_every_circle_is_found_and_named(graph, expected):
    assert import_cycles(graph) == expected
