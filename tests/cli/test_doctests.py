"""The examples in the docstrings of the command line, tasks and evaluation modules run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "lofit.cli.main",
    "lofit.cli.options",
    "lofit.tasks.defaults",
    "lofit.io.output_paths",
    "lofit.io.bundled",
    "lofit.io.loading",
    "lofit.cli.report",
    "lofit.cli.steps",
    "lofit.cli.pipeline",
    "lofit.errors",
    "lofit.tasks.registry",
    "lofit.evaluation",
    "lofit.evaluation.uncertainty",
    "lofit.training.tokens",
    "lofit.evaluation.extraction",
    "lofit.evaluation.forward",
    "lofit.evaluation.bounds",
    "lofit.evaluation.multiple_choice",
    "lofit.evaluation.truthfulqa_mc",
    "lofit.tasks.convert",
    "lofit.tasks.generic",
    "lofit.tasks.records",
]


# Their examples load a benchmark or a real model (marked +SKIP); the tests cover the same calls.
NEEDS_A_REAL_MODEL = {"lofit.tasks.registry", "lofit.evaluation"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(
    name: str, tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # examples may name relative paths
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
    assert result.attempted > 0 or name in NEEDS_A_REAL_MODEL, f"{name} has no runnable example"
