"""The repository's import graph, read with ``ast`` from the source: no import circle among the
runtime packages (mesh without mesh.tools, frontend, dispatcher) nor among the tools
(mesh.tools, which the runtime never imports), and no module importing another module's
``_``-prefixed (private) name.  Imports under ``if TYPE_CHECKING:`` never run, so they cannot
form a circle at import time; they are still read as the dependencies they are (a type names
the module that defines it), and the runtime packages have no circle with them counted either:
a part handed narrow callbacks needs no type of the object that wires it.

Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so such an import also
depends on those packages, except the ones the importing module is itself inside (they are
already being imported when it runs): ``meshctl.registry`` importing ``meshctl.watch`` does
not depend on ``meshctl/__init__`` again, while ``bench`` importing ``meshctl.registry``
would."""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RUNTIME = ("mesh", "frontend", "dispatcher")
TOOLS = "mesh.tools"
#: modules whose private-name imports are checked: the packages and the benchmark scripts
#: (the other tests may reach into what they test)
CHECKED_FOR_PRIVATE_IMPORTS = (*RUNTIME, os.path.join("tests", "bench"))


def _is_tool(module: str) -> bool:
    return module == TOOLS or module.startswith(TOOLS + ".")


def modules_under(folders) -> dict[str, str]:
    """module name -> its file, for every ``.py`` file under ``folders`` (relative to ROOT)."""
    found = {}
    for top in folders:
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = os.path.join(folder, name)
    return found


def runtime_modules() -> dict[str, str]:
    """module name -> its file, for every runtime module."""
    return {m: p for m, p in modules_under(RUNTIME).items() if not _is_tool(m)}


def tool_modules() -> dict[str, str]:
    """module name -> its file, for every module of mesh.tools."""
    return {m: p for m, p in modules_under(["mesh"]).items() if _is_tool(m)}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_statements(module: str, path: str, type_checking: bool = False) -> list[tuple[str, str | None]]:
    """``(base, name)`` for every import Python can execute in ``module`` (and, with
    ``type_checking``, those under ``if TYPE_CHECKING:``): ``import a.b`` is ``("a.b", None)``,
    ``from a import b`` is ``("a", "b")`` with relative bases resolved."""
    is_package = path.endswith("__init__.py")
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out: list[tuple[str, str | None]] = []

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _type_checking_only(node):
                visit(node.body if type_checking else [])
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                out.extend((alias.name, None) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = module.split(".") if is_package else module.split(".")[:-1]
                    here = here[:len(here) - (node.level - 1)]
                    base = ".".join(here + ([base] if base else []))
                out.extend((base, alias.name) for alias in node.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list) and not isinstance(node, (ast.Import, ast.ImportFrom)):
                    visit(inner)

    visit(tree.body)
    return out


def imports_of(module: str, path: str, known: set[str], type_checking: bool = False) -> set[str]:
    """The modules ``module`` imports (whole names; ``from a import b`` counts ``a.b`` when
    that is a module, else ``a``), with the packages each import runs first that ``module``
    is not inside."""
    out: set[str] = set()
    inside = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    for base, name in import_statements(module, path, type_checking):
        full = f"{base}.{name}" if name is not None else base
        target = full if name is None or full in known else base
        out.add(target)
        parts = target.split(".")
        out.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts)))
                   if p in known and p not in inside)
    out.discard(module)
    return out


def private_imports(module: str, path: str, known: set[str]) -> list[str]:
    """``other.name`` for each ``from other import _name`` of ``module``, where ``other`` is
    another module of the repository (dunder names such as ``__version__`` are public)."""
    return sorted(f"{base}.{name}" for base, name in import_statements(module, path)
                  if name is not None and base in known and base != module
                  and name.startswith("_") and not (name.startswith("__") and name.endswith("__")))


def graph(modules: dict[str, str], type_checking: bool = False) -> dict[str, set[str]]:
    known = set(modules_under(RUNTIME)) | {TOOLS}
    return {m: imports_of(m, p, known, type_checking) for m, p in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle among the modules of ``edges``, or None (depth-first search)."""
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
    edges = graph(runtime_modules())
    assert "frontend.node" in edges and "frontend.ingest" in edges["frontend.node"]
    tools = graph(tool_modules())
    assert "mesh.tools.meshctl.registry" in tools["mesh.tools.meshctl"]
    assert {"mesh.tools.kvsession", "mesh.tools.bench", "mesh.tools.bench.report"} <= tools["mesh.tools.meshctl.bench"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_an_import_also_runs_the_packages_above_it(tmp_path):
    """``from p.q import x`` outside ``p`` depends on ``p/__init__`` (a circle if that imports
    the importer); inside ``p`` it does not, and a private name imported is found."""
    absolute, relative = tmp_path / "absolute.py", tmp_path / "relative.py"
    absolute.write_text("from p.q import x, _hidden, __version__\n")
    relative.write_text("from . import _sibling\n")
    known = {"p", "p.q", "r", "r.m"}
    assert imports_of("r.m", str(absolute), known) == {"p", "p.q"}
    assert imports_of("p.m", str(absolute), known) == {"p.q"}
    assert private_imports("r.m", str(absolute), known) == ["p.q._hidden"]
    assert private_imports("r.m", str(relative), known) == ["r._sibling"]
    assert find_cycle({"p": {"r.m"}, "r.m": imports_of("r.m", str(absolute), known),
                       "p.q": set()}) == ["p", "r.m", "p"]


def test_no_runtime_module_imports_another_in_a_circle():
    edges = graph(runtime_modules())
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_a_type_checking_import_counts_only_when_asked(tmp_path):
    typed = tmp_path / "typed.py"
    typed.write_text("from typing import TYPE_CHECKING\nimport typing\nif TYPE_CHECKING:\n"
                     "    from .node import Node\nelse:\n    from . import other\n"
                     "if typing.TYPE_CHECKING:\n    import p.q\n")
    known = {"p", "p.q", "r", "r.node", "r.other", "r.typed"}
    assert imports_of("r.typed", str(typed), known) == {"typing", "r.other"}
    assert imports_of("r.typed", str(typed), known, type_checking=True) == \
        {"typing", "r.other", "r.node", "p", "p.q"}
    assert find_cycle({"r.typed": imports_of("r.typed", str(typed), known, type_checking=True),
                       "r.node": {"r.typed"}}) == ["r.node", "r.typed", "r.node"]


def test_no_runtime_module_imports_another_in_a_circle_even_for_types():
    edges = graph(runtime_modules(), type_checking=True)
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_only_the_frontend_entry_points_import_the_frontend_node():
    """The node wires the frontend's parts; none of them imports it back, even for a type."""
    entry_points = {"frontend", "frontend.__main__"}
    importers = {m for m, imps in graph(runtime_modules(), type_checking=True).items()
                 if "frontend.node" in imps}
    assert importers == entry_points


def test_no_tool_module_imports_another_in_a_circle():
    edges = graph({**runtime_modules(), **tool_modules()})
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_no_runtime_module_imports_the_tools():
    offenders = {m: sorted(i for i in imps if _is_tool(i))
                 for m, imps in graph(runtime_modules()).items()}
    assert not {m: i for m, i in offenders.items() if i}


#: private attributes of Tornado, pyzmq and asyncio objects that code is tempted to reach: any
#: release may rename them (the supported Tornado range is pinned in pyproject.toml, and the
#: public API covers every need: ``RequestHandler.detach``, ``log_exception``, ``write_error``,
#: ``bind_sockets`` + ``add_sockets``, ``HTTPServer.handle_stream``)
LIBRARY_PRIVATES = frozenset({
    "_sockets", "_handlers", "_finished", "_headers", "_headers_written", "_break_cycles",
    "_connections", "_handle_connection", "_request_summary", "_handle_request_exception",
    "_reason", "_status_code", "_write_buffer", "_transforms", "_selector"})


def library_private_uses(path: str) -> list[str]:
    """``line: .name`` for each attribute read or written, and each method defined in a class
    (an override), whose name is in ``LIBRARY_PRIVATES``; read from the syntax tree, so comments
    and strings do not count."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in LIBRARY_PRIVATES:
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ClassDef):
            found.extend(f"{item.lineno}: def {item.name}" for item in node.body
                         if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                         and item.name in LIBRARY_PRIVATES)
    return sorted(found, key=lambda line: int(line.split(":")[0]))


def test_the_private_attribute_scan_sees_reads_writes_and_overrides(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("port = server._sockets\nhandler._finished = True\n# ._headers in a comment\n"
                      "class H:\n    def _handle_request_exception(self, e):\n        return '._reason'\n"
                      "def _connections():\n    pass\n")
    assert library_private_uses(str(sample)) == ["1: ._sockets", "2: ._finished",
                                                 "5: def _handle_request_exception"]


def test_no_code_touches_a_private_attribute_of_a_library_object():
    found = {m: uses for m, p in modules_under(CHECKED_FOR_PRIVATE_IMPORTS).items()
             if (uses := library_private_uses(p))}
    assert not found


def test_no_module_imports_a_private_name_of_another():
    known = set(modules_under(RUNTIME))
    found = {m: private_imports(m, p, known)
             for m, p in modules_under(CHECKED_FOR_PRIVATE_IMPORTS).items()}
    assert not {m: names for m, names in found.items() if names}
