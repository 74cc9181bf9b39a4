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
        [
            "run",
            "--task",
            "truthfulqa",
            "--out",
            "d",
            "--k",
            "0.03",
            "--select-method",
            "random",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--lr-select",
            "1e-3",
            "--lr-train",
            "1e-2",
            "--l1",
            "1e-3",
            "--seed",
            "1",
            "--max-train",
            "10",
            "--max-test",
            "5",
            "--fold",
            "1",
        ]
    )
    assert (args.k, args.select_method, args.epochs, args.fold, args.max_test) == (0.03, "random", 2, 1, 5)


def test_missing_training_file_is_one_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.jsonl"
    code, err = run_cli(
        ["run", "--task", "sft", "--train", str(missing), "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2
    assert "nope.jsonl" in err and "Traceback" not in err


def test_malformed_jsonl_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n{not json\n")
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"prompt": "a", "answers": ["b"]}) + "\n")
    code, err = run_cli(
        ["run", "--task", "sft", "--train", str(train), "--test", str(test), "--out", str(tmp_path / "o")],
        capsys,
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
    result = subprocess.run(
        [sys.executable, "-m", "lofit", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stdout.startswith("lofit ")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import tiny_model, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_run_generic_mc_end_to_end(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    questions = [{"question": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2} for i in range(12)]
    train = _write_jsonl(tmp_path / "train.jsonl", questions[:8])
    test = _write_jsonl(tmp_path / "test.jsonl", questions[8:])
    out = tmp_path / "run"
    code = main(
        [
            "run",
            "--task",
            "mc",
            "--model",
            str(tiny_model_dir),
            "--train",
            str(train),
            "--test",
            str(test),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--k",
            "3",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["base"]) >= {"accuracy"} and set(metrics["lofit"]) >= {"accuracy"}
    assert len(metrics["heads"]) == 3 and metrics["trainable_params"] == 3 * 8
    for name in (
        "heads.json",
        "heads.png",
        "report.md",
        "adapter/lofit_config.json",
        "adapter/lofit_model.safetensors",
    ):
        assert (out / name).is_file(), name
    assert "| accuracy |" in (out / "report.md").read_text()


def test_run_generic_dpo_then_eval_and_merge(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = [{"prompt": f"Q: {i}+1? A:", "chosen": f" {i + 1}", "rejected": f" {i + 2}"} for i in range(10)]
    train = _write_jsonl(tmp_path / "train.jsonl", pairs[:6])
    test = _write_jsonl(tmp_path / "test.jsonl", pairs[6:])
    out = tmp_path / "run"
    args = ["--model", str(tiny_model_dir), "--train", str(train), "--test", str(test)]
    code = main(
        ["run", "--task", "dpo", *args, "--out", str(out), "--epochs", "1", "--k", "2", "--no-progress"]
    )
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    code = main(["eval", "--task", "dpo", *args, "--adapter", str(out / "adapter"), "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == pytest.approx(metrics["lofit"]["accuracy"])
    code = main(
        [
            "merge",
            "--model",
            str(tiny_model_dir),
            "--adapter",
            str(out / "adapter"),
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert code == 0 and (tmp_path / "m" / "config.json").is_file()


def test_auto_precision_resolves_to_a_concrete_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins
    import io

    from lofit import trainer
    from lofit.trainer import TrainingConfig

    assert TrainingConfig(precision="auto").precision in {"bf16", "fp32"}
    real_open = builtins.open
    for flags, expected in (("fpu avx512_bf16 sse", "bf16"), ("fpu sse avx2", "fp32")):
        monkeypatch.setattr(trainer.torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(
            builtins,
            "open",
            lambda path, *a, _flags=flags, **k: (
                io.StringIO(f"flags\t: {_flags}\n") if path == "/proc/cpuinfo" else real_open(path, *a, **k)
            ),
        )
        assert trainer.fastest_precision() == expected


def test_target_modules_and_gradient_checkpointing_options(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [{"prompt": f"{i}+1=", "completion": f"{i + 1}"} for i in range(10)]
    train = _write_jsonl(tmp_path / "train.jsonl", records[:6])
    val = _write_jsonl(tmp_path / "val.jsonl", records[6:8])
    test = _write_jsonl(tmp_path / "test.jsonl", records[8:])
    args = ["--task", "sft", "--model", str(tiny_model_dir), "--train", str(train), "--test", str(test)]
    args += ["--val", str(val)]
    args += ["--epochs", "1", "--k", "2", "--no-progress"]
    out = tmp_path / "run"
    code = main(
        ["run", *args, "--out", str(out), "--target-modules", "self_attn.o_proj", "--gradient-checkpointing"]
    )
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    for step in ("select", "train"):
        assert metrics["settings"][step]["target_modules"] == ["self_attn.o_proj"]
        assert metrics["settings"][step]["gradient_checkpointing"] is True
    adapter_config = json.loads((out / "adapter" / "lofit_config.json").read_text())
    assert "self_attn.o_proj" in json.dumps(adapter_config)
    assert json.loads((out / "heads.json").read_text())["metadata"]["target_modules"] == ["self_attn.o_proj"]
    # validation loss before training (epoch 0) and after the one epoch, for both steps, also in report.md
    for step in ("select", "train"):
        assert [epoch for epoch, _ in metrics["validation"][step]] == [0, 1]
    assert "| epoch | head selection val loss | offset training val loss |" in (out / "report.md").read_text()

    capsys.readouterr()
    code = main(["select", *args, "--out", str(tmp_path / "bad"), "--target-modules", "nothing.here"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nothing.here" in err and "Traceback" not in err
