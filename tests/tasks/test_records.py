"""The one record validator: in-memory training records and files obey the same rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lofit.errors import DataError
from lofit.tasks.generic import load_records
from lofit.tasks.records import as_records, train_val_records

SFT_RECORDS = [
    {"prompt": "Q: 2+3 A:", "completion": " 5"},
    {"prompt": "Q: 10+1 A:", "completion": " 11"},
]


def test_records_are_validated_with_clear_errors() -> None:
    with pytest.raises(DataError, match=r"train_data, index 1, field 'completion': missing required field"):
        as_records([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "sft")
    with pytest.raises(DataError, match=r"index 0, field 'chosen': must be a string"):
        as_records([{"prompt": "a", "chosen": 1, "rejected": "b"}], "dpo")
    with pytest.raises(DataError, match="train_data is empty"):
        as_records([], "sft")
    with pytest.raises(DataError, match="index 0: expected a JSON object"):
        as_records(["text"], "sft")
    with pytest.raises(DataError, match="train_data must be a list of dicts"):
        as_records({"prompt": "a", "completion": "b"}, "sft")
    with pytest.raises(ValueError, match="objective must be one of"):
        as_records(SFT_RECORDS, "ppo")


def test_records_from_a_datasets_dataset() -> None:
    from datasets import Dataset

    records = as_records(Dataset.from_list([{**r, "extra": 1} for r in SFT_RECORDS]), "sft")
    assert records == SFT_RECORDS


@pytest.mark.parametrize(
    ("record", "objective", "field"),
    [
        ({"prompt": "a", "completion": ""}, "sft", "completion"),
        ({"prompt": "a", "completion": "  \n"}, "sft", "completion"),
        ({"prompt": "a", "chosen": "", "rejected": "b"}, "dpo", "chosen"),
        ({"prompt": "a", "chosen": "b", "rejected": " "}, "dpo", "rejected"),
    ],
)
def test_an_empty_completion_is_refused_in_memory_and_in_files(
    record: dict[str, str], objective: str, field: str, tmp_path: Path
) -> None:
    with pytest.raises(DataError, match=rf"val_data, index 0, field '{field}': is empty"):
        train_val_records(
            SFT_RECORDS if objective == "sft" else [{**record, field: "x"}], [record], objective
        )
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"line 1, field '{field}': is empty"):
        load_records(path, objective)


def test_an_empty_prompt_is_accepted_in_memory_and_in_files(tmp_path: Path) -> None:
    record = {"prompt": "", "completion": "x"}
    assert as_records([record], "sft") == [record]
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    assert load_records(path, "sft") == [record]
