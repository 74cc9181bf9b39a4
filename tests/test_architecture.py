"""Structural checks of the whole package: functions fit one screen, every docstring example runs.

(No import cycles: tests/test_import_structure.py.)
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "lofit"
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _long_functions() -> list[str]:
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({length} lines)")
    return long


def test_functions_fit_one_screen() -> None:
    assert _long_functions() == []


# These import vLLM (the `vllm` extra); tests/integrations/test_vllm_*.py cover them where it is installed.
NEEDS_VLLM = {
    "lofit.integrations.vllm.model_classes",
    "lofit.integrations.vllm.router",
    "lofit.integrations.vllm.server",
}


@pytest.mark.parametrize("module_name", sorted(m for m in _modules() if m != "lofit.__main__"))
def test_docstring_examples_run(module_name: str) -> None:
    if module_name in NEEDS_VLLM and importlib.util.find_spec("vllm") is None:
        pytest.skip(f"{module_name} imports vLLM, which is not installed here (pip install 'lofit[vllm]')")
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {module_name} failed"
