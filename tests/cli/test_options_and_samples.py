"""One option vocabulary across subcommands, unknown options answered with the nearest one, and --log-samples."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from lofit.cli.main import build_parser, main
from tiny_models import tiny_model, tiny_tokenizer


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_each_setting_has_one_option_name_in_every_subcommand() -> None:
    spellings: dict[str, set[str]] = {}
    for name, parser in subcommands().items():
        if name == "data":
            continue
        for action in parser._actions:
            long = [o for o in action.option_strings if o.startswith("--")]
            if long and action.dest != "help":
                spellings.setdefault(action.dest, set()).update(long)
    assert {dest: names for dest, names in spellings.items() if len(names) > 1} == {}
    commands = subcommands()
    for command in ("run", "select"):
        assert "--select-method" in commands[command]._option_string_actions
    assert "--lr-select" in commands["select"]._option_string_actions
    assert "--lr-train" in commands["train"]._option_string_actions
    assert "--eval-batch-size" in commands["eval"]._option_string_actions
    for command in ("select", "train", "eval"):  # the old names are gone, not aliases
        assert not {"--method", "--lr"} & set(commands[command]._option_string_actions)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["select", "--task", "mquake", "--out", "x", "--method", "random"], "--method random (did you mean --select-method?)"),
        (["select", "--task", "mquake", "--out", "x", "--lr", "0.1"], "--lr 0.1 (did you mean --lr-select?)"),
        (["train", "--task", "mquake", "--out", "x", "--heads", "h", "--lr", "0.1"], "(did you mean --lr-train?)"),
        (["run", "--task", "mquake", "--out", "x", "--lr", "0.1"], "(did you mean --lr-select or --lr-train?)"),
        (["eval", "--task", "mquake", "--batch-size", "4"], "--batch-size 4 (did you mean --eval-batch-size?)"),
        (["run", "--task", "mquake", "--out", "x", "--max-tets", "5"], "(did you mean --max-test?)"),
        (["run", "--task", "mquake", "--out", "x", "--select-meth", "lofit"], "(did you mean --select-method?)"),
        (["merge", "--adapter", "a", "--out", "o", "--dtyp", "bf16"], "(did you mean --dtype?)"),
    ],
)  # fmt: skip
def test_an_unknown_option_names_the_nearest_valid_one(argv, expected, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"lofit {argv[0]}: error: unrecognized arguments:" in err and expected in err, err


def test_no_option_is_taken_by_abbreviation(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit):
        main(["train", "--task", "mquake", "--out", "x", "--heads", "h", "--lr-tr", "0.1"])
    assert "did you mean --lr-train?" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ --log-samples
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


MC = [{"question": f"Is {i} even?", "choices": ["yes", "no", "maybe"], "answer": i % 2} for i in range(5)]


def test_eval_log_samples_writes_each_records_prompt_scores_prediction_and_gold(
    tmp_path: Path, model_dir: Path
) -> None:
    test = write_jsonl(tmp_path / "test.jsonl", MC)
    out = tmp_path / "metrics.json"
    argv = ["eval", "--task", "mc", "--model", str(model_dir), "--test", str(test), "--no-progress"]
    argv += ["--precision", "fp32"]  # the oracle below runs in fp32 (auto may pick bf16 autocast)
    assert main([*argv, "--out", str(out), "--log-samples"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.samples.jsonl").read_text().splitlines()]
    metrics = json.loads(out.read_text())
    # an independent oracle: the same model scores each continuation after its prompt
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    for index, (row, record) in enumerate(zip(rows, MC, strict=True)):
        # the exact text the model was given: the mc task's template applied
        assert row["index"] == index and row["prompt"] == f"Question: {record['question']}\nAnswer:"
        assert row["gold"] == record["answer"]
        assert row["choices"] == [" " + c for c in record["choices"]]
        context = tokenizer(row["prompt"])["input_ids"]
        for choice, score in zip(row["choices"], row["scores"], strict=True):
            ids = tokenizer(row["prompt"] + choice)["input_ids"]
            with torch.no_grad():
                logprobs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            expected = sum(logprobs[t - 1, ids[t]].item() for t in range(len(context), len(ids)))
            assert score == pytest.approx(expected, abs=1e-4)
        assert row["prediction"] == max(range(3), key=lambda c: row["scores"][c])
    assert sum(row["correct"] for row in rows) / len(rows) == metrics["accuracy"]
    assert metrics["samples"] == str(tmp_path / "metrics.samples.jsonl")
    # an explicit file; without --out and without a file it is refused with the fix
    assert main([*argv, "--log-samples", str(tmp_path / "mine.jsonl")]) == 0
    assert len((tmp_path / "mine.jsonl").read_text().splitlines()) == len(MC)
    assert main([*argv, "--log-samples"]) == 2


def test_eval_log_samples_of_a_generation_task(tmp_path: Path, model_dir: Path) -> None:
    records = [{"prompt": f"{i} plus {i} is", "answers": [str(2 * i)]} for i in range(3)]
    test = write_jsonl(tmp_path / "test.jsonl", records)
    samples = tmp_path / "samples.jsonl"
    argv = ["eval", "--task", "exact_match", "--model", str(model_dir), "--test", str(test), "--no-progress"]
    assert main([*argv, "--log-samples", str(samples)]) == 0
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [row["gold"] for row in rows] == [r["answers"] for r in records]
    assert all(
        row["prompt"] == r["prompt"] and isinstance(row["generation"], str)
        for row, r in zip(rows, records, strict=True)
    )
    assert {"prediction", "correct"} <= set(rows[0])
