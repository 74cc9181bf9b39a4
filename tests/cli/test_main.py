"""The `lofit` command: parsing, and bad input ending in one clear message (no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lofit.cli.main import build_parser, main
from lofit.cli.options import parse_k
from lofit.errors import LofitValueError


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
            "--log-samples",
        ]
    )
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["base"]) >= {"accuracy"} and set(metrics["lofit"]) >= {"accuracy"}
    for name in ("base", "lofit"):  # --log-samples: one row per test record, agreeing with the metric
        rows = [json.loads(line) for line in (out / f"samples-{name}.jsonl").read_text().splitlines()]
        assert [row["index"] for row in rows] == [0, 1, 2, 3]
        assert [row["gold"] for row in rows] == [q["answer"] for q in questions[8:]]
        assert sum(row["correct"] for row in rows) / 4 == metrics[name]["accuracy"]
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
    # the logit lens of every trained offset (App. E), in metrics.json and in report.md
    lens = metrics["logit_lens"]
    assert sorted([e["layer"], e["head"]] for e in lens) == sorted(metrics["heads"])
    assert all(len(e["tokens"]) == len(e["scores"]) == 10 and e["offset_norm"] > 0 for e in lens)
    report = (out / "report.md").read_text()
    assert "## Logit lens of the learned offsets" in report
    assert "lower-layer cache in offset training" in report
    assert f"| ({lens[0]['layer']}, {lens[0]['head']}) |" in report


@pytest.mark.parametrize(("flag", "cached"), [(None, True), ("off", False)])
def test_run_caches_the_layers_below_the_selected_heads_by_default(  # type: ignore[no-untyped-def]
    tmp_path: Path, tiny_model_dir: Path, monkeypatch, capsys: pytest.CaptureFixture[str], flag, cached
) -> None:
    """`lofit run` trains offsets with `--cache-lower-layers auto` unless told otherwise; metrics.json says so."""
    import torch

    import lofit.cli.pipeline
    from lofit.selection.ranking import HeadSelection, rank_heads

    scores = torch.zeros(3, 4)
    scores[1, 2], scores[2, 0] = 2.0, 1.0  # the top two heads sit in layers 1 and 2
    monkeypatch.setattr(
        lofit.cli.pipeline,
        "run_selection",
        lambda *a, **k: HeadSelection(scores, rank_heads(scores), "lofit"),
    )
    pairs = [{"prompt": f"Q: {i}+1? A:", "chosen": f" {i + 1}", "rejected": f" {i + 2}"} for i in range(8)]
    train, test = (
        _write_jsonl(tmp_path / "train.jsonl", pairs[:6]),
        _write_jsonl(tmp_path / "test.jsonl", pairs[6:]),
    )
    args = [
        "run",
        "--task",
        "dpo",
        "--model",
        str(tiny_model_dir),
        "--train",
        str(train),
        "--test",
        str(test),
    ]
    args += [
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "2",
        "--k",
        "2",
        "--no-progress",
        "--precision",
        "fp32",
    ]
    assert main(args + (["--cache-lower-layers", flag] if flag else [])) == 0, capsys.readouterr().err
    cache = json.loads((tmp_path / "run" / "metrics.json").read_text())["lower_layer_cache"]
    if cached:
        assert cache["layer"] == 1 and cache["replayed_forwards"] > 0
    else:
        assert cache is None


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

    import torch

    from lofit.training.settings import TrainingConfig, fastest_precision

    assert TrainingConfig(precision="auto").precision in {"bf16", "fp32"}
    real_open = builtins.open
    for flags, expected in (("fpu avx512_bf16 sse", "bf16"), ("fpu sse avx2", "fp32")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(
            builtins,
            "open",
            lambda path, *a, _flags=flags, **k: (
                io.StringIO(f"flags\t: {_flags}\n") if path == "/proc/cpuinfo" else real_open(path, *a, **k)
            ),
        )
        assert fastest_precision() == expected


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
    assert metrics["settings"]["eval_precision"] in ("bf16", "fp32")  # --precision auto, resolved
    assert metrics["settings"]["select"]["method"] == "lofit"  # the sft task's default selector
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


# ------------------------------------------------------------------ structure and defaults
def test_help_of_every_command_imports_no_torch() -> None:
    """`lofit --help` and `lofit <cmd> --help` parse without importing torch (checked in a fresh process)."""
    script = (
        "import sys\n"
        "from lofit.cli.main import main\n"
        "for argv in ([], ['run'], ['select'], ['train'], ['eval'], ['merge'], ['data'], ['data', 'path']):\n"
        "    try:\n"
        "        main([*argv, '--help'])\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code == 0, (argv, stop.code)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout[-500:]


def test_steps_does_not_import_pipeline() -> None:
    """The pipeline <-> steps import cycle is gone: steps imports neither pipeline nor cli."""
    import ast

    import lofit.cli.steps

    tree = ast.parse(Path(lofit.cli.steps.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"pipeline", "cli"}, imported


def _k_and_select_settings(command: str, tmp_path: Path) -> tuple[float | int, dict]:  # type: ignore[type-arg]
    from lofit.cli.inputs import prepare_data
    from lofit.cli.main import run_options
    from lofit.cli.steps import resolve_k, training_kwargs

    records = _write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Q: a? A:", "answers": ["b"]}])
    sft = _write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Q: a? A:", "completion": " b"}])
    files = ["--train", str(sft), "--val", str(sft), "--test", str(records)]
    extra = ["--heads", "h.json"] if command == "train" else []
    args = build_parser().parse_args([command, "--task", "mquake", *files, "--out", "o", *extra])
    options = run_options(args)
    data = prepare_data(options, needs=("train",))
    return resolve_k(options, data), training_kwargs(options, data.task.defaults, "select")


def test_one_default_k_per_task_for_run_select_and_train(tmp_path: Path) -> None:
    """12.7: `lofit train --task mquake` used k = 0.1 while `lofit run --task mquake` used 0.03."""
    from lofit.tasks.defaults import defaults_for

    found = {command: _k_and_select_settings(command, tmp_path) for command in ("run", "select", "train")}
    assert {k for k, _ in found.values()} == {defaults_for("mquake").k} == {0.03}
    assert found["run"][1] == found["select"][1]  # the same lr, l1, epochs, batch size for step 1
    assert found["run"][1]["l1"] == defaults_for("mquake").l1


def test_api_defaults_come_from_task_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """select_heads / train_offsets take their keyword defaults from lofit.tasks.defaults."""
    import lofit.selection.select
    import lofit.training.offsets
    from lofit.tasks.defaults import SELECT_HEADS_DEFAULTS, TRAIN_OFFSETS_DEFAULTS
    from tiny_models import tiny_model, tiny_tokenizer

    seen: dict[str, dict] = {}  # type: ignore[type-arg]

    class Stop(Exception):
        pass

    def capture(owner: str):  # type: ignore[no-untyped-def]
        def from_kwargs(kwargs, owner=owner, **defaults):  # type: ignore[no-untyped-def]
            seen[owner] = defaults
            raise Stop

        return from_kwargs

    monkeypatch.setattr(lofit.selection.select.TrainingConfig, "from_kwargs", capture("select_heads"))
    records = [{"prompt": "a", "completion": "b"}]
    for call in (lofit.selection.select.select_heads, lofit.training.offsets.train_offsets):
        with pytest.raises(Stop):
            kwargs = {"heads": {0: [0]}} if call is lofit.training.offsets.train_offsets else {}
            call(tiny_model("llama"), tiny_tokenizer(), records, **kwargs)
    assert seen["select_heads"] == SELECT_HEADS_DEFAULTS and seen["train_offsets"] == TRAIN_OFFSETS_DEFAULTS


def test_task_defaults_table_feeds_tasks() -> None:
    from lofit.tasks.defaults import TASK_DEFAULTS
    from lofit.tasks.task import generic_defaults, paper_defaults

    assert paper_defaults("clutrr") == TASK_DEFAULTS["clutrr"].as_dict()
    assert paper_defaults("clutrr")["lr_select"] == 5e-4 and "beta" not in paper_defaults("clutrr")
    assert generic_defaults("dpo")["beta"] == 0.5 and generic_defaults("sft")["k"] == 0.1


# ------------------------------------------------------------------ errors: user (2) vs internal (1)
@pytest.mark.parametrize(
    ("error", "code"),
    [
        (LofitValueError("bad --x"), 2),
        (OSError(28, "No space left on device"), 2),
        (ValueError("a builtin ValueError is a bug"), 1),
        (KeyError("a KeyError is a bug"), 1),
        (RuntimeError("boom"), 1),
        (ImportError("missing"), 1),
    ],
)
def test_only_lofit_errors_and_os_errors_are_user_errors(
    error: BaseException, code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import lofit.cli.steps

    def fail(options):  # type: ignore[no-untyped-def]
        raise error

    monkeypatch.setattr(lofit.cli.steps, "select_step", fail)
    argv = ["select", "--task", "sft", "--out", "o"]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert ("internal error" in err) == (code == 1)
    assert err.startswith("lofit select: error:" if code == 2 else "lofit select: internal error")
    assert main(["--debug", *argv]) == code  # --debug: the same exit code, plus the traceback
    assert "Traceback" in capsys.readouterr().err


# ------------------------------------------------------------------ 12.7: select/train need no --test
def test_select_and_train_mc_need_no_test_file(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    questions = [{"question": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2} for i in range(6)]
    train = _write_jsonl(tmp_path / "train.jsonl", questions)
    common = ["--task", "mc", "--model", str(tiny_model_dir), "--train", str(train), "--epochs", "1"]
    common += ["--no-progress"]
    assert main(["select", *common, "--out", str(tmp_path / "sel")]) == 0, capsys.readouterr().err
    heads = tmp_path / "sel" / "heads.json"
    code = main(["train", *common, "--heads", str(heads), "--k", "2", "--out", str(tmp_path / "off")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "off" / "adapter" / "lofit_model.safetensors").is_file()
    capsys.readouterr()
    assert main(["eval", "--task", "mc", "--model", str(tiny_model_dir), "--no-progress"]) == 2
    assert "pass test_file (--test)" in capsys.readouterr().err  # eval does need the test file


def test_target_modules_reach_every_step_on_an_unknown_architecture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """13.4: steps called find_output_projections without target_modules, so `--target-modules X` on an
    architecture lofit does not know failed before selection started."""
    from transformers import AutoModelForCausalLM, XGLMConfig

    from tiny_models import EOS_ID, PAD_ID, tiny_tokenizer

    config = XGLMConfig(
        vocab_size=128, d_model=32, ffn_dim=64, num_layers=2, attention_heads=4,
        max_position_embeddings=128, pad_token_id=PAD_ID, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
    )  # fmt: skip
    model_dir = tmp_path / "xglm"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    records = [{"prompt": f"{i}+1=", "completion": f"{i + 1}"} for i in range(6)]
    train = _write_jsonl(tmp_path / "train.jsonl", records)
    common = [
        "--task",
        "sft",
        "--model",
        str(model_dir),
        "--train",
        str(train),
        "--epochs",
        "1",
        "--no-progress",
    ]
    common += ["--target-modules", "self_attn.out_proj"]
    assert main(["select", *common, "--k", "3", "--out", str(tmp_path / "sel")]) == 0, capsys.readouterr().err
    heads = tmp_path / "sel" / "heads.json"
    code = main(["train", *common, "--heads", str(heads), "--k", "3", "--out", str(tmp_path / "off")])
    assert code == 0, capsys.readouterr().err
    config_text = (tmp_path / "off" / "adapter" / "lofit_config.json").read_text()
    assert "self_attn.out_proj" in config_text
    capsys.readouterr()
    assert main(["select", *common[:-2], "--out", str(tmp_path / "no")]) == 2  # without: a clear error
    assert "target_modules" in capsys.readouterr().err


# ------------------------------------------------------------------ 12.7: merge options and dtype
def test_merge_help_documents_every_option() -> None:
    merge = build_parser()._subparsers._group_actions[0].choices["merge"]  # type: ignore[union-attr]
    for action in merge._actions:
        assert action.help, action.dest
    assert {"--model", "--adapter", "--out", "--dtype"} <= {
        s for a in merge._actions for s in a.option_strings
    }


def test_merge_dtype_writes_that_dtype(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors import safe_open

    from lofit import LofitConfig, get_lofit_model
    from tiny_models import tiny_model

    adapter = get_lofit_model(tiny_model("llama"), LofitConfig(heads={0: [1]}, init_std=0.1))
    adapter.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    argv = [
        "merge",
        "--model",
        str(tiny_model_dir),
        "--adapter",
        str(tmp_path / "adapter"),
        "--out",
        str(out),
    ]
    assert main([*argv, "--dtype", "bf16"]) == 0, capsys.readouterr().err
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        dtypes = {str(weights.get_slice(name).get_dtype()) for name in weights.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}, dtypes


# ------------------------------------------------------------------ 12.7: standard errors in the report
def test_standard_errors_match_an_independent_computation() -> None:
    import statistics

    from lofit.evaluation.uncertainty import metric_uncertainty

    base_correct = [1, 0, 0, 1, 0, 1, 1, 0]
    lofit_correct = [1, 1, 0, 1, 1, 1, 1, 0]
    base_mc2 = [0.2, 0.5, 0.9, 0.4, 0.3, 0.6, 0.7, 0.1]
    lofit_mc2 = [0.3, 0.5, 0.8, 0.6, 0.5, 0.6, 0.9, 0.2]

    def details(correct: list[int], mc2: list[float]) -> list[dict]:  # type: ignore[type-arg]
        return [{"mc1": float(c), "mc2": m} for c, m in zip(correct, mc2, strict=True)]

    base = ({"mc1": 0.5, "mc2": statistics.mean(base_mc2)}, details(base_correct, base_mc2))
    adapted = ({"mc1": 0.75, "mc2": statistics.mean(lofit_mc2)}, details(lofit_correct, lofit_mc2))
    found = metric_uncertainty(base, adapted)
    n = 8
    assert found["n"] == n
    assert found["base"]["mc1"] == pytest.approx((0.5 * 0.5 / n) ** 0.5)  # binomial
    assert found["lofit"]["mc1"] == pytest.approx((0.75 * 0.25 / n) ** 0.5)
    assert found["base"]["mc2"] == pytest.approx(statistics.stdev(base_mc2) / n**0.5)
    differences = [a - b for a, b in zip(lofit_mc2, base_mc2, strict=True)]
    assert found["change"]["mc2"] == pytest.approx(statistics.stdev(differences) / n**0.5)
    paired = [a - b for a, b in zip(lofit_correct, base_correct, strict=True)]
    assert found["change"]["mc1"] == pytest.approx(statistics.stdev(paired) / n**0.5)


def test_run_report_and_metrics_carry_n_and_standard_errors(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    questions = [{"question": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2} for i in range(14)]
    train = _write_jsonl(tmp_path / "train.jsonl", questions[:6])
    test = _write_jsonl(tmp_path / "test.jsonl", questions[6:])
    out = tmp_path / "run"
    argv = ["run", "--task", "mc", "--model", str(tiny_model_dir), "--train", str(train), "--test", str(test)]
    assert main([*argv, "--out", str(out), "--epochs", "1", "--k", "2", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    uncertainty = metrics["uncertainty"]
    assert uncertainty["n"] == 8 and set(uncertainty["base"]) == {"accuracy", "accuracy_norm"}
    p = metrics["base"]["accuracy"]
    assert uncertainty["base"]["accuracy"] == pytest.approx((p * (1 - p) / 8) ** 0.5)
    report = (out / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| accuracy |"))
    assert row.count("±") == 3 - (uncertainty["change"]["accuracy"] is None), row
    assert "n = 8 test records" in report


# ------------------------------------------------------------------ 14.5: divergence and truncation
def test_non_finite_adapter_is_never_saved_and_names_the_lr(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    import lofit.training.offsets

    real = lofit.training.offsets.train_offsets

    def diverged(*args, **kwargs):  # type: ignore[no-untyped-def]
        model = real(*args, **kwargs)
        with torch.no_grad():
            next(iter(model.adapter_parameters())).fill_(float("inf"))
        return model

    monkeypatch.setattr(lofit.training.offsets, "train_offsets", diverged)
    records = [{"prompt": f"{i}+1=", "completion": f"{i + 1}"} for i in range(4)]
    train = _write_jsonl(tmp_path / "train.jsonl", records)
    common = [
        "--task",
        "sft",
        "--model",
        str(tiny_model_dir),
        "--train",
        str(train),
        "--epochs",
        "1",
        "--no-progress",
    ]
    assert main(["select", *common, "--out", str(tmp_path / "sel")]) == 0
    out = tmp_path / "off"
    argv = ["train", *common, "--heads", str(tmp_path / "sel" / "heads.json"), "--k", "2", "--lr-train", "5"]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "lr=5.0" in err and "(--lr-train)" in err, err
    assert not (out / "adapter").exists()


def test_truncation_warning_says_the_completion_was_cut(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long = {"prompt": "Q: a long prompt here? A:", "completion": " a long completion of many tokens"}
    short = {"prompt": "Q: a long prompt here? A:", "completion": " a"}
    train = _write_jsonl(tmp_path / "train.jsonl", [long, short])
    argv = ["select", "--task", "sft", "--model", str(tiny_model_dir), "--train", str(train), "--epochs", "1"]
    with pytest.warns(
        UserWarning, match="in 1 of them the completion/response alone was longer, so it was cut"
    ):
        assert main([*argv, "--no-progress", "--max-length", "12", "--out", str(tmp_path / "o")]) == 0
    argv[argv.index(str(train))] = str(_write_jsonl(tmp_path / "all_long.jsonl", [long] * 2))
    assert main([*argv, "--no-progress", "--max-length", "12", "--out", str(tmp_path / "q")]) == 2
    assert "every one of the 2 sequences is longer than max_length=12" in capsys.readouterr().err
    argv[argv.index(str(tmp_path / "all_long.jsonl"))] = str(
        _write_jsonl(tmp_path / "short.jsonl", [short] * 2)
    )
    with pytest.warns(UserWarning, match=r"truncated by up to \d+ tokens \(prompt cut from the left\)$"):
        assert main([*argv, "--no-progress", "--max-length", "12", "--out", str(tmp_path / "p")]) == 0


def test_eval_out_carries_n_and_standard_errors(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    questions = [{"question": f"Is {i} even?", "choices": ["yes", "no"], "answer": i % 2} for i in range(5)]
    test = _write_jsonl(tmp_path / "test.jsonl", questions)
    out = tmp_path / "metrics.json"
    argv = ["eval", "--task", "mc", "--model", str(tiny_model_dir), "--test", str(test), "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    written = json.loads(out.read_text())
    p = written["accuracy"]
    assert written["n"] == 5 and written["standard_errors"]["accuracy"] == pytest.approx(
        (p * (1 - p) / 5) ** 0.5
    )
    assert json.loads(capsys.readouterr().out) == written


def test_task_help_names_every_task() -> None:
    """The --task help is static text (parsing imports no task code); it must list every task there is."""
    from lofit.cli.main import TASK_HELP
    from lofit.tasks import TASK_NAMES

    assert [name for name in TASK_NAMES if name not in TASK_HELP] == []


def test_wilson_interval_where_the_standard_error_is_zero() -> None:
    import math

    from lofit.cli.report import metrics_table
    from lofit.evaluation.uncertainty import metric_uncertainty, wilson_interval

    z = 1.96
    for successes, n in ((0, 16), (3, 10), (10, 10)):
        p = successes / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        low, high = wilson_interval(successes, n)  # type: ignore[misc]
        assert low == pytest.approx(max(0.0, centre - half)) and high == pytest.approx(
            min(1.0, centre + half)
        )
    zero = [{"correct": False, "correct_norm": False}] * 16
    found = metric_uncertainty(({"accuracy": 0.0}, zero), ({"accuracy": 0.0}, zero))
    assert found["base"]["accuracy"] == 0.0 and found["interval95"]["base"]["accuracy"][1] == pytest.approx(
        0.1936, abs=1e-4
    )
    row = metrics_table({"accuracy": 0.0}, {"accuracy": 0.0}, found).splitlines()[-1]
    assert "0.0 [95%: 0.0, 19.4]" in row, row


def test_run_scores_the_base_once_and_reuses_it(  # type: ignore[no-untyped-def]
    tmp_path: Path, tiny_model_dir: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second `lofit run` on the same base, test records and protocol takes the base metrics from the cache."""
    monkeypatch.setenv("LOFIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LOFIT_EVAL_CACHE")  # tests/conftest.py turns the cache off elsewhere
    questions = [{"question": f"Is {i} odd?", "choices": ["yes", "no"], "answer": i % 2} for i in range(10)]
    train = _write_jsonl(tmp_path / "train.jsonl", questions[:6])
    test = _write_jsonl(tmp_path / "test.jsonl", questions[6:])
    common = [
        "run",
        "--task",
        "mc",
        "--model",
        str(tiny_model_dir),
        "--train",
        str(train),
        "--test",
        str(test),
    ]
    runs = []
    for name, seed in (("first", "1"), ("second", "2")):
        options = ["--epochs", "1", "--batch-size", "2", "--k", "2", "--seed", seed, "--no-progress"]
        code = main([*common, "--out", str(tmp_path / name), *options])
        assert code == 0, capsys.readouterr().err
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert runs[0]["base_cache"].startswith("stored ") and runs[1]["base_cache"].startswith("hit ")
    assert runs[1]["base"] == runs[0]["base"]
    assert runs[1]["uncertainty"]["n"] == runs[0]["uncertainty"]["n"] == 4


def test_the_selector_is_the_task_s_default_unless_given(tmp_path: Path) -> None:
    """TruthfulQA's default selector is the one-pass gradient-adam (validated at fold-0 scale); others L1."""
    from types import SimpleNamespace

    from lofit.cli.main import run_options
    from lofit.cli.steps import resolve_select_method
    from lofit.tasks.defaults import defaults_for

    def chosen(task: str, *extra: str) -> str:
        args = build_parser().parse_args(["select", "--task", task, "--out", "o", *extra])
        data = SimpleNamespace(task=SimpleNamespace(defaults=defaults_for(task).as_dict()))
        return resolve_select_method(run_options(args), data)  # type: ignore[arg-type]

    assert chosen("truthfulqa") == "gradient-adam"
    assert chosen("mquake") == chosen("clutrr") == chosen("sft") == "lofit"
    assert chosen("truthfulqa", "--select-method", "lofit") == "lofit"
    assert chosen("mquake", "--select-method", "gradient-adam") == "gradient-adam"
