"""The command line's name lists come from their one home (torch-free), so they cannot drift apart."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from lofit.cli.main import build_parser
from lofit.io import loading
from lofit.io.quantization import QUANTIZATIONS
from lofit.selection.selectors import METHODS, SELECTORS
from lofit.training.settings import PRECISIONS


def _choices(command: str, option: str) -> list[str]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = commands.choices[command]
    action = next(a for a in sub._actions if option in a.option_strings)
    assert action.choices is not None, (command, option)
    return list(action.choices)


@pytest.mark.parametrize(("command", "option"), [("select", "--select-method"), ("run", "--select-method")])
def test_selector_choices_are_the_registry(command: str, option: str) -> None:
    assert _choices(command, option) == list(METHODS) == list(SELECTORS)


@pytest.mark.parametrize("command", ["run", "select", "train", "eval"])
def test_quantization_and_precision_choices_are_the_loaders(command: str) -> None:
    assert _choices(command, "--quantization") == list(QUANTIZATIONS)
    assert loading.QUANTIZATIONS is QUANTIZATIONS
    assert _choices(command, "--precision") == ["auto", *PRECISIONS]


def test_options_and_the_name_tables_import_no_torch() -> None:
    script = (
        "import sys\n"
        "import lofit.cli.options, lofit.selection.selectors, lofit.io.quantization\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout[-500:]
