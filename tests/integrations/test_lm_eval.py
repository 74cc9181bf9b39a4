"""lm-evaluation-harness as the outside evaluator: it picks the same choice as `lofit eval` on every record.

`lofit eval --log-samples` logs each record's exact prompt and scored continuations; lm-eval (a local
multiple-choice task over those very rows, `target_delimiter: ""`) scores a merged export (`lofit merge`,
plain transformers, no lofit) and must choose the same answer for every record, with each choice's
log-probability within `TOLERANCE`. The fast test uses a tiny random model; the slow one the bundled SmolLM2
on 50 ARC-Easy questions, for the base model and for a merged LoFiT model.
"""

from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import lofit
from lofit.cli.main import main
from tiny_models import tiny_model, tiny_tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in lofit's dev extra")

TOLERANCE = (
    1e-3  # per-choice log-prob difference (two fp32 implementations; measured: see the asserts' output)
)


def lm_eval_scores(model_dir: Path, rows: list[dict[str, Any]], work: Path) -> list[list[float]]:
    """lm-eval's per-choice log-likelihoods of `rows` (lofit's sample rows) for the checkpoint in `model_dir`."""
    from lm_eval.tasks import TaskManager

    work.mkdir(parents=True, exist_ok=True)
    data = work / "lm_eval_docs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": r["prompt"], "choices": r["choices"], "gold": r["gold"]}) + "\n"
            for r in rows
        )
    )
    (work / "tasks").mkdir(exist_ok=True)
    (work / "tasks" / "lofit_samples.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: lofit_samples
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {data}
            test_split: test
            output_type: multiple_choice
            doc_to_text: "{{{{prompt}}}}"
            doc_to_choice: "{{{{choices}}}}"
            doc_to_target: gold
            target_delimiter: ""
            metric_list:
              - metric: acc
                higher_is_better: true
            """
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_dir},dtype=float32",
            tasks=["lofit_samples"],
            task_manager=TaskManager(include_path=str(work / "tasks")),
            log_samples=True,
            batch_size=8,
            device="cpu",
        )
    samples = sorted(results["samples"]["lofit_samples"], key=lambda s: s["doc_id"])
    return [[float(response[0]) for response in sample["filtered_resps"]] for sample in samples]


def compare(rows: list[dict[str, Any]], outside: list[list[float]]) -> tuple[int, float]:
    """(records where both choose the same answer, the largest per-choice log-prob difference)."""
    same, gap = 0, 0.0
    for row, scores in zip(rows, outside, strict=True):
        assert len(scores) == len(row["scores"])
        same += int(max(range(len(scores)), key=scores.__getitem__) == row["prediction"])
        gap = max(gap, *(abs(a - b) for a, b in zip(scores, row["scores"], strict=True)))
    return same, gap


def lofit_eval_rows(argv: list[str], work: Path, name: str) -> list[dict[str, Any]]:
    samples = work / f"{name}.samples.jsonl"
    assert main([*argv, "--no-progress", "--log-samples", str(samples)]) == 0
    return [json.loads(line) for line in samples.read_text().splitlines()]


def test_lm_eval_agrees_with_lofit_eval_on_a_merged_export(tmp_path: Path) -> None:
    base_dir, adapter, merged = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = lofit.get_lofit_model(
        tiny_model("llama"), lofit.LofitConfig(heads={1: [0, 2], 2: [3]}, init_std=0.5)
    )
    model.save_pretrained(adapter)
    assert main(["merge", "--model", str(base_dir), "--adapter", str(adapter), "--out", str(merged)]) == 0
    words = ["the", "cat", "dog", "sat", "ran", "on", "in", "a", "mat", "park", "red", "blue"]
    generator = torch.Generator().manual_seed(0)

    def phrase(n: int) -> str:
        return " ".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=generator))

    records = [
        {"question": phrase(5) + "?", "choices": [phrase(1 + i) for i in range(4)], "answer": k % 4}
        for k in range(24)
    ]
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["eval", "--task", "mc", "--model", str(base_dir), "--test", str(test), "--precision", "fp32"]
    rows = lofit_eval_rows([*argv, "--adapter", str(adapter)], tmp_path, "lofit")
    same, gap = compare(rows, lm_eval_scores(merged, rows, tmp_path))
    print(f"tiny llama, merged LoFiT: {same}/{len(rows)} same choice, max per-choice |d log p| {gap:.2e}")
    assert same == len(rows) and gap <= TOLERANCE
    base_rows = lofit_eval_rows(argv, tmp_path, "base")
    assert [r["scores"] for r in base_rows] != [r["scores"] for r in rows]  # the adapter changes the scores


@pytest.mark.slow
def test_lm_eval_agrees_with_lofit_eval_on_arc_easy_with_the_bundled_model(tmp_path: Path) -> None:
    base, tokenizer = lofit.load_model("smollm2-135m", dtype=torch.float32)
    base_dir, adapter, merged = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    torch.manual_seed(0)
    model = lofit.get_lofit_model(
        base, lofit.LofitConfig(heads={3: [1, 4], 7: [0], 12: [2, 8]}, init_std=0.2)
    )
    model.save_pretrained(adapter)
    assert main(["merge", "--model", str(base_dir), "--adapter", str(adapter), "--out", str(merged)]) == 0
    argv = ["eval", "--task", "arc_easy", "--model", str(base_dir), "--max-test", "50", "--precision", "fp32"]
    for name, extra, checkpoint in (("base", [], base_dir), ("lofit", ["--adapter", str(adapter)], merged)):
        rows = lofit_eval_rows([*argv, *extra], tmp_path, name)
        same, gap = compare(rows, lm_eval_scores(checkpoint, rows, tmp_path / name))
        print(
            f"SmolLM2-135M ARC-Easy, {name}: {same}/{len(rows)} same choice, max per-choice |d log p| {gap:.2e}"
        )
        assert len(rows) == 50 and same == 50 and gap <= TOLERANCE
