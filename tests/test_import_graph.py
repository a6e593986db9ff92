"""The package's modules import each other without circles, counting imports made inside functions and those made
only for type checking: a circle means two modules that should be one, or a third that both need."""

from __future__ import annotations

import ast
from pathlib import Path

import sd3serve

ROOT = Path(sd3serve.__file__).resolve().parent


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sd3serve"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("sd3serve"))
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules in order), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_find_cycle_finds_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_circle() -> None:
    graph = import_graph()
    assert "sd3serve.engine.pipeline" in graph and "sd3serve.api.app" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_api_reaches_the_engine_and_the_ledger_only_through_the_service() -> None:
    """Routes decode the wire into an order or a read and encode the answer: whatever they need of the model engine
    or the database comes through ``sd3serve.service``."""
    below = ("sd3serve.engine", "sd3serve.ledger")
    reaching = {
        module: sorted(dep for dep in deps if dep.startswith(below))
        for module, deps in import_graph().items()
        if module.startswith("sd3serve.api")
    }
    assert "sd3serve.api.routes.v2" in reaching
    assert {module: deps for module, deps in reaching.items() if deps} == {}


def test_the_import_walk_sees_imports_inside_functions() -> None:
    graph = import_graph()
    assert "sd3serve.engine.batching" in graph["sd3serve.service.runtime"]  # imported inside running()


def test_the_database_is_reached_only_through_the_ledger() -> None:
    """Outside ``sd3serve.ledger`` nothing opens a SQLAlchemy session, connection or transaction of its own (the
    service goes through ``Ledger.run`` / ``Ledger.call``): of SQLAlchemy, only its error types and ``make_url`` are
    imported there. And nothing calls ``run_in_threadpool``."""
    src = Path(sd3serve.__file__).parent
    used: dict[str, set[str]] = {}
    for path in src.rglob("*.py"):
        if path.relative_to(src).parts[0] == "ledger":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
                used.setdefault(str(path.relative_to(src)), set()).update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import) and any(a.name.startswith("sqlalchemy") for a in node.names):
                used.setdefault(str(path.relative_to(src)), set()).add("import sqlalchemy")
    allowed = {"sqlalchemy.exc.DBAPIError", "sqlalchemy.engine.make_url"}
    assert {module: names - allowed for module, names in used.items() if names - allowed} == {}
    assert [p for p in src.rglob("*.py") if "run_in_threadpool" in p.read_text()] == []
