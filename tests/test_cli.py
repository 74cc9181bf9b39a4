"""The `lofit` command: parsing, and bad input ending in one clear message (no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lofit.cli import build_parser, main
from lofit.pipeline import parse_k


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err


def test_parse_k_int_and_fraction() -> None:
    assert parse_k("27") == 27 and isinstance(parse_k("27"), int)
    assert parse_k("0.1") == pytest.approx(0.1)
    assert parse_k("1") == 1


def test_run_parser_has_api_options() -> None:
    args = build_parser().parse_args(
        ["run", "--task", "truthfulqa", "--out", "d", "--k", "0.03", "--select-method", "random", "--epochs", "2",
         "--batch-size", "4", "--lr-select", "1e-3", "--lr-train", "1e-2", "--l1", "1e-3", "--seed", "1",
         "--max-train", "10", "--max-test", "5", "--fold", "1"]
    )
    assert (args.k, args.select_method, args.epochs, args.fold, args.max_test) == (0.03, "random", 2, 1, 5)


def test_missing_training_file_is_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.jsonl"
    code, err = run_cli(["run", "--task", "sft", "--train", str(missing), "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert "nope.jsonl" in err and "Traceback" not in err


def test_malformed_jsonl_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{not json\n")
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"prompt": "a", "answers": ["b"]}) + "\n")
    code, err = run_cli(
        ["run", "--task", "sft", "--train", str(train), "--test", str(test), "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert "train.jsonl" in err and "line 2" in err and "Traceback" not in err


def test_missing_field_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "a"}) + "\n")
    code, err = run_cli(["run", "--task", "sft", "--train", str(train), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "completion" in err and "line 1" in err


def test_unknown_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["run", "--task", "nosuchtask", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "nosuchtask" in err


def test_console_script_version() -> None:
    result = subprocess.run([sys.executable, "-m", "lofit", "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.startswith("lofit ")
