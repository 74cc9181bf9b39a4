"""Steps that can take long show progress bars on stderr, and `--no-progress` hides them."""

from __future__ import annotations

from pathlib import Path

import pytest

import lofit
from lofit.cli.main import main
from tiny_models import tiny_model, tiny_tokenizer


@pytest.fixture
def base_and_adapter(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    lofit.get_lofit_model(tiny_model("llama"), lofit.LofitConfig(heads={1: [0]})).save_pretrained(
        tmp_path / "adapter"
    )
    return base, tmp_path / "adapter"


def test_merge_shows_its_steps_unless_no_progress(tmp_path: Path, base_and_adapter, capsys) -> None:  # type: ignore[no-untyped-def]
    base, adapter = base_and_adapter
    assert (
        main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "m1")]) == 0
    )
    err = capsys.readouterr().err
    assert "lofit merge" in err and "3/3" in err, err
    argv = [
        "merge",
        "--model",
        str(base),
        "--adapter",
        str(adapter),
        "--out",
        str(tmp_path / "m2"),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "lofit merge" not in capsys.readouterr().err


def test_eval_shows_its_scoring_unless_no_progress(tmp_path: Path, base_and_adapter, capsys) -> None:  # type: ignore[no-untyped-def]
    base, adapter = base_and_adapter
    test = tmp_path / "test.jsonl"
    test.write_text('{"question": "Is 2 even?", "choices": ["yes", "no"], "answer": 0}\n' * 3)
    argv = ["eval", "--task", "mc", "--model", str(base), "--adapter", str(adapter), "--test", str(test)]
    assert main(argv) == 0
    assert "scoring" in capsys.readouterr().err
    assert main([*argv, "--no-progress"]) == 0
    assert "scoring" not in capsys.readouterr().err
