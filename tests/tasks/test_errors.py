"""Malformed input raises `DataError` whose message names the file, the line and the field to fix."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from lofit.tasks import DataError, load_records, load_task
from lofit.tasks.llm_adapters import load_llm_adapters

# (file name, content, kind or None, expected line, expected field, a phrase of the problem)
CASES = [
    (
        "missing.jsonl",
        '{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n',
        "sft",
        2,
        "completion",
        "missing required field",
    ),
    ("type.jsonl", '{"prompt": 3, "completion": "b"}\n', "sft", 1, "prompt", "must be a string, got int"),
    (
        "range.jsonl",
        '{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": ["a", "b", "c"], "answer": 3}\n',
        None,
        2,
        "answer",
        "3 is out of range for 3 choices",
    ),
    (
        "empty_choices.jsonl",
        '{"question": "q", "choices": [], "answer": 0}\n',
        "mc",
        1,
        "choices",
        "empty list",
    ),
    (
        "one_choice.jsonl",
        '{"question": "q", "choices": ["a"], "answer": 0}\n',
        "mc",
        1,
        "choices",
        "has only 1 choice",
    ),
    (
        "str_answer.jsonl",
        '{"question": "q", "choices": ["a", "b"], "answer": "1"}\n',
        "mc",
        1,
        "answer",
        "must be an integer",
    ),
    (
        "bool_answer.jsonl",
        '{"question": "q", "choices": ["a", "b"], "answer": true}\n',
        "mc",
        1,
        "answer",
        "must be an integer",
    ),
    (
        "choice_type.jsonl",
        '{"question": "q", "choices": ["a", 2], "answer": 0}\n',
        "mc",
        1,
        "choices",
        "entry 1 must be a string",
    ),
    (
        "answers_str.jsonl",
        '{"prompt": "p", "answers": "Rome"}\n',
        "exact_match",
        1,
        "answers",
        "must be a list",
    ),
    (
        "empty_chosen.jsonl",
        '{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n{"prompt": "p", "chosen": "  ", "rejected": "b"}\n',
        None,
        3,
        "chosen",
        "is empty",
    ),
    (
        "pretty.json",
        json.dumps([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}], indent=2),
        None,
        6,
        "completion",
        "missing required field",
    ),
    (
        "wrapped.json",
        '{"version": 1,\n "data": [\n  {"prompt": "p", "answers": ["x"]},\n  {"prompt": "p", "answers": [""]}\n ]}',
        None,
        4,
        "answers",
        "entry 0 is empty",
    ),
    ("cols.csv", "prompt,answer\nQ,Rome\n", "exact_match", 2, "answers", "missing required field"),
    (
        "int.csv",
        "question,choices,answer\nq,a; b,1\nq,a; b,two\n",
        None,
        3,
        "answer",
        'must be an integer, got str "two"',
    ),
    (
        "multiline.csv",
        'question,choices,answer\n"a question\nover two lines",a; b,0\nq,"[""a"", ""b""",0\n',
        None,
        4,
        "choices",
        "not a valid JSON array",
    ),
    (
        "tqa.jsonl",
        '{"question": "q", "best_answer": "b", "correct_answers": ["b"], "incorrect_answers": []}\n',
        None,
        1,
        "incorrect_answers",
        "empty list",
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "kind", "line", "field", "problem"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_record_names_file_line_and_field(
    tmp_path: Path, name: str, content: str, kind: str | None, line: int, field: str, problem: str
) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_records(path, kind)
    message = str(info.value)
    assert message.startswith(f"{path}, line {line}, field '{field}': "), message
    assert problem in message
    assert (info.value.source, info.value.line, info.value.field) == (str(path), line, field)
    assert isinstance(info.value, ValueError)


# (file name, content, expected line, a phrase of the problem): errors that concern no single field
FILE_CASES = [
    (
        "syntax.jsonl",
        '{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n',
        2,
        "invalid JSON",
    ),
    ("syntax.json", '[\n {"prompt": "a",\n  "completion": "b"},\n]\n', 4, "invalid JSON"),
    ("empty.jsonl", "", 1, "holds no records"),
    ("blank.json", "[]", 1, "holds no records"),
    ("header_only.csv", "prompt,completion\n", 1, "holds no records"),
    ("unknown.jsonl", '{"text": "a"}\n', 1, "cannot tell the record format"),
    ("not_object.jsonl", '["a", "b"]\n', 1, "expected a record"),
    ("scalar.json", '"hello"', 1, "must hold a list of records"),
    ("wide.csv", "prompt,completion\na,b,c\n", 2, "has 3 cells but the header has 2"),
]


@pytest.mark.parametrize(("name", "content", "line", "problem"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_file_names_file_and_line(
    tmp_path: Path, name: str, content: str, line: int, problem: str
) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_records(path)
    assert str(info.value).startswith(f"{path}, line {line}: "), str(info.value)
    assert problem in str(info.value)


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found\. Fix: check the path\."):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=r"data\.txt: unsupported file type '\.txt'\. Fix: give a \.jsonl"):
        load_records(tmp_path / "data.txt")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl, line 2: the file is not UTF-8"):
        load_records(tmp_path / "latin1.jsonl")


def test_in_memory_records_are_named_by_record_number() -> None:
    with pytest.raises(DataError, match=r"^<list of records>, record 2, field 'rejected': missing required"):
        load_records([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}], "dpo")
    with pytest.raises(DataError, match=r"^<list of records>, record 1: expected a record"):
        load_records(["just text"])
    with pytest.raises(DataError, match=r"^<list of records>: holds no records"):
        load_records([])
    with pytest.raises(DataError, match=r"unknown record format 'sfx'"):
        load_records([{"prompt": "a", "completion": "b"}], "sfx")


def test_fix_hint_and_pickling() -> None:
    error = DataError("f.csv", 3, "answer", "4 is out of range for 3 choices", "use 0, 1 or 2")
    assert str(error) == "f.csv, line 3, field 'answer': 4 is out of range for 3 choices. Fix: use 0, 1 or 2."
    clone = pickle.loads(pickle.dumps(error))
    assert str(clone) == str(error) and clone.field == "answer"


def test_benchmark_file_errors(tmp_path: Path) -> None:
    adapters = tmp_path / "arc.jsonl"
    adapters.write_text(
        json.dumps(
            {
                "instruction": "Please choose the correct answer to the question: q\n\nAnswer1: a "
                "Answer2: b\n\nAnswer format: answer1/answer2",
                "answer": "answer2",
                "output": "the correct answer is answer2",
            }
        )
        + "\n"
        + json.dumps({"instruction": "Pick one: a or b", "answer": "answer1"})
        + "\n"
    )
    with pytest.raises(DataError, match=r"arc\.jsonl, line 2, field 'instruction': does not follow"):
        load_llm_adapters(adapters, "arc_easy")
    adapters.write_text(
        json.dumps(
            {
                "instruction": "Please choose the correct answer to the question: q\n\nAnswer1: a "
                "Answer2: b\n\nAnswer format: answer1/answer2",
                "answer": "answer3",
            }
        )
        + "\n"
    )
    with pytest.raises(DataError, match=r"arc\.jsonl, line 1, field 'answer': 'answer3' is not one of"):
        load_llm_adapters(adapters, "arc_easy")

    folder = tmp_path / "data" / "truthfulqa" / "lofit_splits"
    folder.mkdir(parents=True)
    header = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
    good = "A,C,Can pigs fly?,No,No; Never,Yes,src\n"
    for split in ("train", "val", "test"):
        (folder / f"fold_0_{split}_seed_42.csv").write_text(header + good)
    (folder / "fold_0_val_seed_42.csv").write_text(header + good + "A,C,Q2,,x,y,src\n")
    with pytest.raises(
        DataError, match=r"fold_0_val_seed_42\.csv, line 3, field 'Best Answer': missing or empty"
    ):
        load_task("truthfulqa", tmp_path / "data")

    mquake = tmp_path / "data" / "mquake"
    mquake.mkdir()
    case = {
        "requested_rewrite": [{"prompt": "{} is a citizen of", "subject": "X", "target_new": {"str": "Y"}}],
        "questions": ["Where?"],
        "new_answer": "Y",
        "new_answer_alias": [],
    }
    broken = {**case, "questions": []}
    for split in ("train", "val"):
        (mquake / f"{split}.jsonl").write_text(json.dumps(case) + "\n")
    (mquake / "test.jsonl").write_text(json.dumps(case) + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(DataError, match=r"test\.jsonl, line 2, field 'questions'"):
        load_task("mquake", tmp_path / "data")
    (mquake / "test.jsonl").write_text(json.dumps(case) + "\n")
    task = load_task("mquake", tmp_path / "data")
    assert task.test == [{"prompt": "Q: Imagine that X is a citizen of Y. Where? A:", "answers": ["Y"]}]
