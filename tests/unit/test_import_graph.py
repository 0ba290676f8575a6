"""The qwenvl_mcore package has no import circle, and production code never imports qwenvl_mcore.testing.

The graph is read from the source (ast): every `import` and `from ... import` of a qwenvl_mcore module, at module
level and inside functions alike (a function-level import only postpones a circle to the first call). Imports
under `if TYPE_CHECKING:` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "qwenvl_mcore"
TESTING = "qwenvl_mcore.testing"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> the qwenvl_mcore modules it imports (a name inside a module counts as that module)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_nodes(tree)
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.split(".")[0] == "qwenvl_mcore"}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module or ""
                if base.split(".")[0] != "qwenvl_mcore":
                    continue
                targets |= {resolve(f"{base}.{a.name}") for a in node.names}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_of_every_kind():
    """The reader finds module-level, function-level and relative-free `from package import module` edges."""
    graph = import_graph()
    assert "qwenvl_mcore.parallel.context_parallel" in graph["qwenvl_mcore.parallel.layout"]  # from pkg import mod
    assert "qwenvl_mcore.models.qwen3_vl_moe.config" in graph["qwenvl_mcore.training.memory"]  # inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    found = cycles(import_graph())
    assert found == [], "import circles (break each by moving the shared piece down):\n" + "\n".join(
        " <-> ".join(c) for c in found)


def test_production_code_never_imports_testing():
    graph = import_graph()
    offenders = {m: sorted(t for t in targets if t.startswith(TESTING))
                 for m, targets in graph.items() if not m.startswith(TESTING)}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_the_layout_knows_parallel_sizes_only():
    """parallel/layout.py imports no model code: the model checks its own divisibility (layout_checks.py)."""
    graph = import_graph()
    assert not any(t.startswith("qwenvl_mcore.models") for t in graph["qwenvl_mcore.parallel.layout"])
