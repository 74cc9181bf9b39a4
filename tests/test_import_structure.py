"""The package's structure: layers that import only downwards, no cycles, short functions, a true README map."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lofit

SRC = Path(lofit.__file__).parent
README = SRC.parent.parent / "README.md"

# Bottom to top: a package may import only packages listed before it (and itself). The root package
# `lofit` is the public facade above everything; below it, only its `__version__` may be imported.
LAYERS = [
    "lofit.errors",
    "lofit.io",
    "lofit.tasks",
    "lofit.adapters",
    "lofit.training",
    "lofit.selection",
    "lofit.evaluation",
    "lofit.baselines",
    "lofit.integrations",
    "lofit.cli",
]
TOP_LEVEL_LIMIT = 12
FUNCTION_LINE_LIMIT = 60


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
            # The root facade imports everything lazily; below it only `__version__` is imported from the
            # root (test_only_the_version_comes_from_the_root_package), assigned before any other import.
            graph[name].update(c for c in candidates if c in files and c not in {name, "lofit"})
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
    unexpected = cycles(import_graph())
    assert unexpected == []


def test_persistence_knows_no_model_class() -> None:
    graph = import_graph()
    assert (
        not {
            "lofit.adapters.model",
            "lofit.adapters.folding",
            "lofit.integrations.export",
            "lofit.adapters.merged",
        }
        & graph["lofit.adapters.persistence"]
    )
    assert (
        "lofit.adapters.model" not in graph["lofit.adapters.folding"]
        and "lofit.adapters.model" not in graph["lofit.adapters.base"]
    )


def package_of(module: str) -> str:
    """lofit.adapters.model -> lofit.adapters; lofit.errors -> lofit.errors; lofit -> lofit."""
    parts = module.split(".")
    return ".".join(parts[:2])


def root_imports() -> dict[str, set[str]]:
    """module -> the names it imports from the root package `lofit` itself."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                depth = len(package.split(".")) - node.level + 1 if node.level else 0
                if (node.level and depth == 1 and not node.module) or (
                    not node.level and node.module == "lofit"
                ):
                    found.setdefault(name, set()).update(alias.name for alias in node.names)
    return found


def test_every_package_has_a_layer() -> None:
    packages = {package_of(m) for m in import_graph()} - {"lofit", "lofit.__main__"}
    assert packages == set(LAYERS)


def test_top_level_has_at_most_twelve_entries() -> None:
    entries = [p.name for p in SRC.iterdir() if p.name != "__pycache__" and (p.suffix == ".py" or p.is_dir())]
    assert len(entries) <= TOP_LEVEL_LIMIT, sorted(entries)


def test_no_upward_imports() -> None:
    rank = {package: index for index, package in enumerate(LAYERS)}
    upward = []
    for module, targets in import_graph().items():
        source = package_of(module)
        if source not in rank:
            continue
        for target in targets:
            if rank[package_of(target)] > rank[source]:
                upward.append(f"{module} -> {target}")
    assert sorted(upward) == []


def test_only_the_version_comes_from_the_root_package() -> None:
    others = {
        m: names - {"__version__"}
        for m, names in root_imports().items()
        if m not in {"lofit", "lofit.__main__"}
    }
    assert {m: n for m, n in others.items() if n} == {}


def test_no_cycles_between_packages() -> None:
    packages: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        packages.setdefault(package_of(module), set()).update(
            package_of(t) for t in targets if package_of(t) != package_of(module)
        )
    assert cycles(packages) == []


def test_the_layer_finder_catches_an_upward_import() -> None:
    rank = {package: index for index, package in enumerate(LAYERS)}
    assert rank[package_of("lofit.cli.steps")] > rank[package_of("lofit.adapters.model")]


def test_functions_are_short() -> None:
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > FUNCTION_LINE_LIMIT:
                    long.append(f"{path.relative_to(SRC)}:{node.name} ({length} lines)")
    assert long == []


def readme_map() -> dict[str, list[str]]:
    """The README's "How the code is laid out" table: package -> the modules it names, in row order."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        match = re.match(r"\|\s*`(?P<package>[\w.]+)`\s*\|(?P<modules>[^|]*)\|", line)
        if match:
            rows[match["package"]] = re.findall(r"`(\w+)`", match["modules"])
    return rows


def test_readme_map_lists_the_layers_in_order_and_every_module() -> None:
    rows = readme_map()
    assert list(rows) == [p.removeprefix("lofit.") for p in LAYERS]
    for package, modules in rows.items():
        folder = SRC / package
        actual = (
            sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__") if folder.is_dir() else []
        )
        assert sorted(modules) == actual, package


def test_no_two_modules_share_a_name() -> None:
    """One name, one module: a reader who sees `records` or `model` knows which file is meant."""
    stems: dict[str, list[str]] = {}
    for path in SRC.rglob("*.py"):
        if path.name not in {"__init__.py", "__main__.py"}:
            stems.setdefault(path.stem, []).append(str(path.relative_to(SRC)))
    assert {stem: paths for stem, paths in stems.items() if len(paths) > 1} == {}
