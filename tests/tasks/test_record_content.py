"""Record contents that no tokenizer takes or that make a score meaningless are refused with a `DataError`
naming the file, the line and the field: NUL bytes, lone UTF-16 surrogates, repeated choices, an answer
both correct and incorrect, a DPO pair of one response. Published benchmark data is scored as published.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lofit.tasks import DataError, load_records, load_task
from lofit.tasks.records import Where, text_problem, validate_record

MC = {"question": "q", "choices": ["a", "b"], "answer": 0}
TQA = {"question": "q", "best_answer": "Yes.", "correct_answers": ["Yes."], "incorrect_answers": ["No."]}
SFT = {"prompt": "p", "completion": "c"}
DPO = {"prompt": "p", "chosen": "good", "rejected": "bad"}
EM = {"prompt": "p", "answers": ["a"]}

# (name, kind, record written as JSON text, field named, phrase of the problem)
JSON_CASES = [
    ("NUL in a question", "mc", {**MC, "question": "a\u0000b"}, "question", "NUL byte at character 1"),
    ("NUL in a choice", "mc", {**MC, "choices": ["a", "b\u0000"]}, "choices", "entry 1 holds a NUL byte"),
    ("NUL in a prompt", "sft", {**SFT, "prompt": "\u0000"}, "prompt", "NUL byte"),
    ("NUL in a completion", "sft", {**SFT, "completion": "c\u0000"}, "completion", "NUL byte"),
    ("NUL in an answer", "exact_match", {**EM, "answers": ["\u0000x"]}, "answers", "NUL byte"),
    ("NUL in a chosen response", "dpo", {**DPO, "chosen": "g\u0000"}, "chosen", "NUL byte"),
    ("NUL in a best answer", "truthfulqa_mc", {**TQA, "best_answer": "Y\u0000"}, "best_answer", "NUL"),
    ("lone high surrogate in a question", "mc", {**MC, "question": "a\ud800b"}, "question", r"U\+D800"),
    ("lone low surrogate in a question", "mc", {**MC, "question": "\udc00"}, "question", r"U\+DC00"),
    ("lone surrogate in a prompt", "exact_match", {**EM, "prompt": "x\udbff"}, "prompt", r"U\+DBFF"),
    ("lone surrogate in a completion", "sft", {**SFT, "completion": "\ud83d"}, "completion", "surrogate"),
    ("lone surrogate in a rejected response", "dpo", {**DPO, "rejected": "\ud800"}, "rejected", "surrogate"),
    ("lone surrogate in an incorrect answer", "truthfulqa_mc", {**TQA, "incorrect_answers": ["\udfff"]},
     "incorrect_answers", "entry 0 holds a lone"),
    ("duplicate choices", "mc", {**MC, "choices": ["x", "x"]}, "choices", "choices 0 and 1 are the same"),
    ("duplicate choices but for spaces", "mc", {**MC, "choices": ["x", "y", " x "]}, "choices",
     "choices 0 and 2"),
    ("an answer correct and incorrect", "truthfulqa_mc", {**TQA, "incorrect_answers": ["Yes"]},
     "incorrect_answers", "listed as correct and as incorrect"),
    ("chosen == rejected", "dpo", {**DPO, "rejected": "good"}, "rejected", "same text as 'chosen'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "record", "field", "phrase"),
    [case[1:] for case in JSON_CASES],
    ids=[case[0] for case in JSON_CASES],
)
def test_bad_content_in_a_jsonl_file(
    tmp_path: Path, kind: str, record: dict[str, object], field: str, phrase: str
) -> None:
    path = tmp_path / "data.jsonl"
    good = {"mc": MC, "truthfulqa_mc": TQA, "sft": SFT, "dpo": DPO, "exact_match": EM}[kind]
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")  # ASCII JSON: \u escapes
    with pytest.raises(DataError, match=phrase) as error:
        load_records(path, kind)
    message = str(error.value)
    assert str(path) in message and "line 2" in message and repr(field) in message
    assert "Fix:" in message


CSV_CASES = [
    ("NUL in a question cell", 'question,choices,answer\n"a\x00b","x;y",0\n', "question", "NUL byte"),
    ("NUL in a choices cell", 'question,choices,answer\nq,"x;\x00y",0\n', "choices", "NUL byte"),
    ("duplicate choices in a cell", "question,choices,answer\nq,x;y;x,0\n", "choices", "choices 0 and 2"),
]


@pytest.mark.parametrize(
    ("text", "field", "phrase"), [c[1:] for c in CSV_CASES], ids=[c[0] for c in CSV_CASES]
)
def test_bad_content_in_a_csv_file(tmp_path: Path, text: str, field: str, phrase: str) -> None:
    path = tmp_path / "data.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=phrase) as error:
        load_records(path, "mc")
    assert repr(field) in str(error.value)


@pytest.mark.parametrize(
    "text",
    ["plain", "", "é ü 中文 🙂", "\U0001f600", "\u2028 line separator", "\ufeff", "tab\tnewline\n"],
)
def test_legitimate_text_passes(text: str) -> None:
    assert text_problem(text) is None
    record = validate_record({"prompt": text, "completion": "x"}, "sft", Where("mem", 1))
    assert record["prompt"] == text


def test_distinct_checks_can_be_left_to_published_data() -> None:
    record = {**MC, "choices": ["x", "x"]}
    assert validate_record(record, "mc", Where("mem", 1), distinct=False)["choices"] == ["x", "x"]
    with pytest.raises(DataError, match="NUL"):  # text checks always apply
        validate_record({**MC, "question": "\x00"}, "mc", Where("mem", 1), distinct=False)


@pytest.mark.parametrize(("name", "fold"), [("truthfulqa", 0), ("openbookqa", 0)])
def test_published_benchmarks_with_repeats_still_load(name: str, fold: int) -> None:
    """TruthfulQA fold 0 lists "Unknown." on both sides once; OpenBookQA repeats a choice once."""
    data = Path(__file__).resolve().parents[3] / "shared" / "data"
    if not (data / name).is_dir():
        pytest.skip(f"no {name} data at {data}")
    task = load_task(name, data_dir=data, fold=fold)
    assert task.test
