"""The package's structure: no import cycles, small functions in the adapter layer (issue 13)."""

from __future__ import annotations

import ast
from pathlib import Path

import lofit

SRC = Path(lofit.__file__).parent
# Cycles in modules other sessions are restructuring (issue 13 item 1); remove an entry once it is gone.
KNOWN_CYCLES: list[set[str]] = []  # none left (issue 13 item 1)
ADAPTER_MODULES = [
    "adapter_base.py",
    "architectures.py",
    "config.py",
    "export.py",
    "heads.py",
    "layer.py",
    "lm_head.py",
    "merge.py",
    "merged.py",
    "model.py",
    "persistence.py",
    "wrappers.py",
    "baselines/red.py",
    "baselines/parameters.py",
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the lofit modules it imports anywhere (module level or inside functions)."""
    files = {_module_name(path): path for path in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    stem = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(stem + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(c for c in candidates if c in files and c != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycles() -> None:
    unexpected = [c for c in cycles(import_graph()) if c not in KNOWN_CYCLES]
    assert unexpected == []


def test_persistence_knows_no_model_class() -> None:
    graph = import_graph()
    assert not {"lofit.model", "lofit.merge", "lofit.export", "lofit.merged"} & graph["lofit.persistence"]
    assert "lofit.model" not in graph["lofit.merge"] and "lofit.model" not in graph["lofit.adapter_base"]


def test_adapter_functions_are_short() -> None:
    long = []
    for relative in ADAPTER_MODULES:
        tree = ast.parse((SRC / relative).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 60:
                    long.append(f"{relative}:{node.name} ({length} lines)")
    assert long == []
