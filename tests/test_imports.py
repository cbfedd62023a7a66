"""The runtime packages' import graph (mesh without mesh.tools, frontend, dispatcher), read
with ``ast`` from the source: no import circle, and no runtime module imports mesh.tools (the
operators' and tests' tools).  Imports under ``if TYPE_CHECKING:`` are left out: Python never
executes them, so they cannot form a circle at import time."""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RUNTIME = ("mesh", "frontend", "dispatcher")


def runtime_modules() -> dict[str, str]:
    """module name -> its file, for every runtime module."""
    found = {}
    for package in RUNTIME:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                module = ".".join(parts)
                if module == "mesh.tools" or module.startswith("mesh.tools."):
                    continue
                found[module] = os.path.join(folder, name)
    return found


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, path: str, known: set[str]) -> set[str]:
    """The modules ``module`` imports (whole names; ``from a import b`` counts ``a.b`` when
    that is a module, else ``a``)."""
    is_package = path.endswith("__init__.py")
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out: set[str] = set()

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _type_checking_only(node):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                out.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = module.split(".") if is_package else module.split(".")[:-1]
                    here = here[:len(here) - (node.level - 1)]
                    base = ".".join(here + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    out.add(full if full in known else base)
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list) and not isinstance(node, (ast.Import, ast.ImportFrom)):
                    visit(inner)

    visit(tree.body)
    out.discard(module)
    return out


def graph() -> dict[str, set[str]]:
    modules = runtime_modules()
    known = set(modules) | {"mesh.tools"}
    return {m: imports_of(m, p, known) for m, p in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle among the runtime modules, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if n not in edges:
                continue
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = walk(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            found = walk(m)
            if found:
                return found
    return None


def test_the_graph_is_read_from_the_source():
    edges = graph()
    assert "frontend.node" in edges and "frontend.ingest" in edges["frontend.node"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_runtime_module_imports_another_in_a_circle():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_no_runtime_module_imports_the_tools():
    offenders = {m: sorted(i for i in imps if i == "mesh.tools" or i.startswith("mesh.tools."))
                 for m, imps in graph().items()}
    assert not {m: i for m, i in offenders.items() if i}
