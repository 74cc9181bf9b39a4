"""Generic record files (jsonl/json/csv), in-memory inputs, conversions and the generic tasks."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from lofit.tasks import DataError, Task, convert_records, detect_kind, load_records, load_task
from lofit.tasks.llm_adapters import STYLES, load_llm_adapters, parse_instruction

SFT = [
    {"prompt": "Q: capital of France? A:", "completion": " Paris"},
    {"prompt": 'He said "hi",\nthen left.', "completion": " ok; fine"},
]
DPO = [
    {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " green"},
    {"prompt": "Q: 2+2? A:", "chosen": " 4", "rejected": " 5"},
]
MC = [
    {"question": "Which is a fruit?", "choices": ["apple", "chair", "rock"], "answer": 0},
    {"question": "2+2?", "choices": ["3", "4"], "answer": 1},
]
EM = [
    {"prompt": "Capital of Italy:", "answers": ["Rome", "Roma"]},
    {"prompt": "Largest planet:", "answers": ["Jupiter"]},
]
TQA = [
    {
        "question": "Can pigs fly?",
        "best_answer": "No, pigs cannot fly.",
        "correct_answers": ["No, pigs cannot fly.", "Pigs cannot fly on their own."],
        "incorrect_answers": ["Yes, pigs can fly.", "Pigs fly in spring."],
    }
]
ALL = {"sft": SFT, "dpo": DPO, "mc": MC, "exact_match": EM, "truthfulqa_mc": TQA}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path: Path, records: list[dict[str, Any]], list_style: str = "json") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        for r in records:
            row = {}
            for key, value in r.items():
                if isinstance(value, list):
                    value = json.dumps(value) if list_style == "json" else "; ".join(value)
                row[key] = value
            writer.writerow(row)
    return path


@pytest.mark.parametrize("kind", list(ALL))
@pytest.mark.parametrize("fmt", ["jsonl", "json", "json_data", "csv"])
def test_round_trip(tmp_path: Path, kind: str, fmt: str) -> None:
    records = ALL[kind]
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "r.jsonl", records)
    elif fmt == "json":
        path = tmp_path / "r.json"
        path.write_text(json.dumps(records, indent=2))
    elif fmt == "json_data":
        path = tmp_path / "r.json"
        path.write_text(json.dumps({"meta": {"data": 1}, "data": records}, indent=1))
    else:
        path = write_csv(tmp_path / "r.csv", records)
    assert load_records(path) == records
    assert load_records(path, kind) == records
    assert load_records(str(path)) == records


def test_csv_semicolon_lists(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "mc.csv", MC, list_style="semicolon")
    assert load_records(path) == MC
    path = write_csv(tmp_path / "em.csv", EM, list_style="semicolon")
    assert load_records(path, "exact_match") == EM
    (tmp_path / "tight.csv").write_text("prompt,answers\nQ,a;b ;  c\n")
    assert load_records(tmp_path / "tight.csv") == [{"prompt": "Q", "answers": ["a", "b", "c"]}]


def test_extra_fields_are_dropped_and_bom_blank_lines_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(
        '\ufeff{"prompt": "a", "completion": "b", "id": 7}\n\n{"prompt": "", "completion": "c"}\n'
    )
    assert load_records(path) == [{"prompt": "a", "completion": "b"}, {"prompt": "", "completion": "c"}]


def test_in_memory_inputs() -> None:
    assert load_records(MC) == MC
    assert load_records(tuple(DPO), "dpo") == DPO
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(MC)
    assert load_records(ds) == MC
    bad = datasets.Dataset.from_list([{"question": "q", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(DataError, match=r"<datasets\.Dataset>, record 1, field 'answer'"):
        load_records(bad)


def test_detect_kind() -> None:
    assert [detect_kind(v[0]) for v in ALL.values()] == list(ALL)
    assert detect_kind({"text": "x"}) is None


def test_hub_source_needs_split() -> None:
    with pytest.raises(DataError, match=r"hf:owner/name.*needs a name and a split"):
        load_records("hf:owner/name")


# --- conversions --------------------------------------------------------------------------------------


def test_conversions() -> None:
    assert convert_records(SFT, "sft", "exact_match") == [
        {"prompt": r["prompt"], "answers": [r["completion"]]} for r in SFT
    ]
    assert convert_records(DPO, "dpo", "mc") == [
        {"question": "Q: sky? A:", "choices": [" blue", " green"], "answer": 0},
        {"question": "Q: 2+2? A:", "choices": [" 4", " 5"], "answer": 0},
    ]
    assert convert_records(MC, "mc", "sft") == [
        {"prompt": "Question: Which is a fruit?\nAnswer:", "completion": " apple"},
        {"prompt": "Question: 2+2?\nAnswer:", "completion": " 4"},
    ]
    assert convert_records(MC, "mc", "dpo")[1] == {
        "prompt": "Question: 2+2?\nAnswer:",
        "chosen": " 4",
        "rejected": " 3",
    }
    assert convert_records(EM, "exact_match", "sft")[0] == {
        "prompt": "Capital of Italy:",
        "completion": "Rome",
    }
    assert convert_records(TQA, "truthfulqa_mc", "dpo") == [
        {"prompt": "Q: Can pigs fly? A:", "chosen": "No, pigs cannot fly.", "rejected": "Yes, pigs can fly."}
    ]
    with pytest.raises(DataError, match=r"f\.jsonl: holds 'sft' records, but 'mc' records are needed"):
        convert_records(SFT, "sft", "mc", "f.jsonl")


# --- generic tasks ------------------------------------------------------------------------------------


def test_generic_sft_task(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", SFT)
    val = write_jsonl(tmp_path / "val.jsonl", SFT[:1])
    task = load_task("sft", train_file=train, val_file=val, test_file=train)
    assert (task.objective, task.eval_task, task.extraction, task.max_new_tokens) == (
        "sft",
        "exact_match",
        None,
        16,
    )
    assert task.train == SFT and task.val == SFT[:1]
    assert task.val_eval == [{"prompt": SFT[0]["prompt"], "answers": [" Paris"]}]
    assert task.test == convert_records(SFT, "sft", "exact_match")
    assert task.defaults == {
        "lr_select": 5e-3,
        "lr_train": 1e-2,
        "epochs": 5,
        "batch_size": 8,
        "l1": 1e-3,
        "k": 0.1,
        "select_method": "lofit",
    }
    assert task.sources == {"train": str(train), "val": str(val), "test": str(train)}


def test_generic_sft_task_with_mc_test(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", SFT)
    test = write_jsonl(tmp_path / "test.jsonl", MC)
    task = load_task("sft", train_file=train, val_file=train, test_file=test)
    assert task.eval_task == "mc" and task.test == MC and task.max_new_tokens is None
    assert task.val == SFT and task.val_eval == []  # SFT records cannot become "mc" records


def test_generic_dpo_task(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", DPO)
    task = load_task("dpo", train_file=train, val_file=train, test_file=train)
    assert (task.objective, task.eval_task) == ("dpo", "mc")
    assert task.test == convert_records(DPO, "dpo", "mc") == task.val_eval
    assert task.defaults["beta"] == 0.5
    assert load_task("dpo", train_file=train).eval_task == "mc"
    tqa = write_jsonl(tmp_path / "tqa.jsonl", TQA)
    assert load_task("dpo", train_file=tqa, test_file=tqa).eval_task == "truthfulqa_mc"


def test_generic_mc_and_exact_match_tasks(tmp_path: Path) -> None:
    mc = write_jsonl(tmp_path / "mc.jsonl", MC)
    task = load_task("mc", train_file=mc, val_file=mc, test_file=mc)
    assert task.eval_task == "mc" and task.train == convert_records(MC, "mc", "sft") and task.val_eval == MC
    em = write_csv(tmp_path / "em.csv", EM, list_style="semicolon")
    task = load_task("exact_match", train_file=em, test_file=em)
    assert task.eval_task == "exact_match" and task.train[1] == {
        "prompt": "Largest planet:",
        "completion": "Jupiter",
    }
    assert task.val == [] and task.val_eval == []


def test_generic_task_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"pass train_file \(--train\)"):
        load_task("sft")
    with pytest.raises(DataError, match=r"pass test_file \(--test\)"):
        load_task("mc", train_file=write_jsonl(tmp_path / "mc.jsonl", MC))
    dpo = write_jsonl(tmp_path / "dpo.jsonl", DPO)
    with pytest.raises(DataError, match=r"dpo\.jsonl: holds 'dpo' records, but 'sft' records are needed"):
        load_task("sft", train_file=dpo)
    with pytest.raises(DataError, match=r"unknown task 'nope'.*truthfulqa, mquake, clutrr"):
        load_task("nope")


def test_builtin_task_from_user_files_only(tmp_path: Path) -> None:
    # all three splits given: the built-in data is never looked up (the data dir does not exist)
    dpo = write_jsonl(tmp_path / "dpo.jsonl", DPO)
    tqa = write_jsonl(tmp_path / "tqa.jsonl", TQA)
    task = load_task("truthfulqa", tmp_path / "missing", train_file=dpo, val_file=tqa, test_file=tqa)
    assert (task.objective, task.eval_task) == ("dpo", "truthfulqa_mc")
    assert task.train == DPO and task.val == convert_records(TQA, "truthfulqa_mc", "dpo") and task.test == TQA
    em = write_jsonl(tmp_path / "em.jsonl", EM)
    task = load_task("clutrr", tmp_path / "missing", train_file=em, val_file=em, test_file=em)
    assert task.extraction == "clutrr" and task.max_new_tokens == 16 and task.train[0]["completion"] == "Rome"


def test_task_validates_its_settings() -> None:
    with pytest.raises(ValueError, match="objective"):
        Task("x", "rl", "mc", [], [], [], [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eval_task"):
        Task("x", "sft", "bleu", [], [], [], [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="extraction"):
        Task("x", "sft", "exact_match", [], [], [], [], extraction="regex")  # type: ignore[arg-type]
    task = Task("x", "sft", "exact_match", [], [], [], [])
    assert task.max_new_tokens == 16 and task.summary() == "x: sft training 0/0, exact_match val 0 test 0"


# --- LLM-Adapters instruction parsing (synthetic rows; the real files are checked in test_tasks_benchmarks) --


@pytest.mark.parametrize("benchmark", ["arc_easy", "openbookqa", "piqa", "winogrande"])
def test_llm_adapters_parse_round_trip(tmp_path: Path, benchmark: str) -> None:
    style = STYLES[benchmark]
    question, choices = "Why is the sky\n\nblue?", ["light scatters ", "paint", "the sea: it reflects"]
    text = style.render(question, choices)
    assert parse_instruction(text, style) == (question, choices)
    assert parse_instruction(text.replace("3: ", "4: "), style) is None
    key = style.label.lower()
    rows = [
        {"instruction": text, "input": "", "output": f"the correct answer is {key}3", "answer": f"{key}3"}
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert load_llm_adapters(path, benchmark) == [{"question": question, "choices": choices, "answer": 2}]
    rows[0]["output"] = f"the correct answer is {key}1"
    with pytest.raises(DataError, match=r"rows\.jsonl, line 1, field 'output': .* disagrees with answer"):
        load_llm_adapters(write_jsonl(path, rows), benchmark)


def test_arc_instruction_literal() -> None:
    text = (
        "Please choose the correct answer to the question: Which factor will most likely cause a person to "
        "develop a fever?\n\nAnswer1: a leg muscle relaxing after exercise Answer2: a bacterial population in "
        "the bloodstream Answer3: several viral particles on the skin Answer4: carbohydrates being digested in "
        "the stomach\n\nAnswer format: answer1/answer2/answer3/answer4"
    )
    assert parse_instruction(text, STYLES["arc_easy"]) == (
        "Which factor will most likely cause a person to develop a fever?",
        [
            "a leg muscle relaxing after exercise",
            "a bacterial population in the bloodstream",
            "several viral particles on the skin",
            "carbohydrates being digested in the stomach",
        ],
    )
