"""The record formats every part of lofit exchanges, and their validation.

Training records
    "sft"            {"prompt": str, "completion": str}
    "dpo"            {"prompt": str, "chosen": str, "rejected": str}
Evaluation records
    "truthfulqa_mc"  {"question": str, "best_answer": str, "correct_answers": [str], "incorrect_answers": [str]}
    "mc"             {"question": str, "choices": [str], "answer": int}   (answer = 0-based index into choices)
    "exact_match"    {"prompt": str, "answers": [str]}

Validation returns a new dict holding exactly these fields (extra input fields are dropped). Every problem
raises `DataError` naming the source, the line (or record number) and the field. This is the one record
validator: files (`lofit.tasks.generic`), the benchmark loaders and the training entry points
(`as_records`, for records passed in memory) all check records here, by the same rules. In particular a
completion (and a DPO response) must hold text: an empty or blank one is refused, since it would give
training nothing to score; a prompt may be empty. Beyond the types, texts
may hold no NUL byte and no lone UTF-16 surrogate (no tokenizer takes them), a multiple-choice record
no two identical choices, a TruthfulQA record no answer that is both correct and incorrect, and a DPO
record no chosen response equal to the rejected one (each would make the score or the loss meaningless).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from ..errors import DataError

RecordKind = Literal["sft", "dpo", "truthfulqa_mc", "mc", "exact_match"]
TRAINING_KINDS: tuple[RecordKind, ...] = ("sft", "dpo")
EVAL_KINDS: tuple[RecordKind, ...] = ("truthfulqa_mc", "mc", "exact_match")
RECORD_KINDS: tuple[RecordKind, ...] = TRAINING_KINDS + EVAL_KINDS


class SFTRecord(TypedDict):
    """A supervised fine-tuning record: the completion is scored after the prompt."""

    prompt: str
    completion: str


class DPORecord(TypedDict):
    """A preference record: the chosen response is preferred over the rejected one after the prompt."""

    prompt: str
    chosen: str
    rejected: str


class TruthfulQARecord(TypedDict):
    """A TruthfulQA multiple-choice record (MC1/MC2), answers as lists of strings."""

    question: str
    best_answer: str
    correct_answers: list[str]
    incorrect_answers: list[str]


class MCRecord(TypedDict):
    """A multiple-choice record: `answer` is the 0-based index of the correct choice."""

    question: str
    choices: list[str]
    answer: int


class ExactMatchRecord(TypedDict):
    """A generation record: a greedy completion matches if it equals one of `answers`."""

    prompt: str
    answers: list[str]


Record = dict[str, Any]

# Field type per kind: "text" may be empty, "nonempty" may not, "list" is a non-empty list of non-empty
# strings, "index" an int. Prompts may be empty (an unconditional completion is legitimate); answers not.
FIELDS: dict[str, dict[str, str]] = {
    "sft": {"prompt": "text", "completion": "nonempty"},
    "dpo": {"prompt": "text", "chosen": "nonempty", "rejected": "nonempty"},
    "truthfulqa_mc": {
        "question": "nonempty",
        "best_answer": "nonempty",
        "correct_answers": "list",
        "incorrect_answers": "list",
    },
    "mc": {"question": "nonempty", "choices": "list", "answer": "index"},
    "exact_match": {"prompt": "nonempty", "answers": "list"},
}

_INT_TEXT = re.compile(r"^\s*[+-]?\d+\s*$")


@dataclass(frozen=True)
class Where:
    """Where a record came from, for error messages: a file and 1-based line, or a record number."""

    source: str
    line: int | None
    label: str = "line"
    text_cells: bool = False  # values are raw CSV cell strings (lists and ints still to be parsed)

    def error(self, field: str | None, problem: str, fix: str | None = None) -> DataError:
        """A `DataError` located here (source, line) about `field`."""
        return DataError(self.source, self.line, field, problem, fix, line_label=self.label)


def field_list(kind: str) -> str:
    """The field names of record format `kind`, quoted, for messages."""
    return ", ".join(f"'{name}'" for name in FIELDS[kind])


def detect_kind(record: Mapping[str, Any]) -> RecordKind | None:
    """Guess the record format from the field names present.

    Args:
        record: one record.

    Returns:
        The format, or None when nothing matches.

    Example:
        >>> detect_kind({"prompt": "q", "chosen": "a", "rejected": "b"})
        'dpo'
    """
    keys = set(record)
    if {"prompt", "chosen", "rejected"} <= keys:
        return "dpo"
    if {"question", "best_answer"} <= keys:
        return "truthfulqa_mc"
    if {"question", "choices"} <= keys:
        return "mc"
    if {"prompt", "answers"} <= keys:
        return "exact_match"
    if {"prompt", "completion"} <= keys:
        return "sft"
    return None


def require_kind(kind: str, where: Where | None = None) -> RecordKind:
    """`kind` if it is a known record format; DataError (located at `where`) otherwise."""
    if kind not in RECORD_KINDS:
        problem = f"unknown record format {kind!r}"
        fix = f"use one of {', '.join(RECORD_KINDS)}"
        if where is None:
            raise DataError(None, None, None, problem, fix)
        raise where.error(None, problem, fix)
    return kind


def detect_or_fail(record: Mapping[str, Any], where: Where) -> RecordKind:
    """`detect_kind`, or a DataError at `where` listing every format's fields."""
    kind = detect_kind(record)
    if kind is None:
        present = ", ".join(repr(k) for k in record) or "none"
        formats = "; ".join(f"{k}: {field_list(k)}" for k in RECORD_KINDS)
        raise where.error(
            None,
            f"cannot tell the record format from its fields (found {present})",
            f"give every record the fields of one format ({formats})",
        )
    return kind


def validate_record(record: Any, kind: str, where: Where, *, distinct: bool = True) -> Record:
    """Check one record against format `kind` and return a clean copy with only that format's fields.

    Args:
        record: the raw record (a mapping; CSV cells are parsed where `where.text_cells`).
        kind: the record format.
        where: its location, for error messages.
        distinct: refuse repeated choices, answers both correct and incorrect, and DPO pairs of one
            response. The benchmark loaders pass False: published data is scored as published (OpenBookQA
            repeats a choice, TruthfulQA lists "Unknown." on both sides once).

    Returns:
        The clean record.

    Raises:
        DataError: naming the location and field, and the fix.
    """
    kind = require_kind(kind, where)
    if not isinstance(record, Mapping):
        raise where.error(
            None,
            f"expected a JSON object with fields {field_list(kind)}, got {_describe(record)}",
            "write each record as an object such as " + _example(kind),
        )
    clean: Record = {}
    for name, ftype in FIELDS[kind].items():
        if name not in record or record[name] is None:
            raise where.error(
                name,
                "missing required field",
                f"add '{name}' ({kind!r} records need the fields {field_list(kind)})",
            )
        clean[name] = _check_value(record[name], name, ftype, where)
    if distinct:
        _check_distinct(clean, kind, where)
    if kind == "mc":
        n = len(clean["choices"])
        if n < 2:
            raise where.error("choices", "has only 1 choice", "give at least two choices")
        if not 0 <= clean["answer"] < n:
            raise where.error(
                "answer",
                f"{clean['answer']} is out of range for {n} choices",
                f"set 'answer' to the 0-based index of the correct choice (0 to {n - 1})",
            )
    return clean


def objective_fields(objective: str) -> tuple[str, ...]:
    """The record fields of the training objective named `objective` ("sft" or "dpo").

    Example:
        >>> objective_fields("dpo")
        ('prompt', 'chosen', 'rejected')
    """
    if objective not in TRAINING_KINDS:
        raise DataError(
            None, None, None, f"objective must be one of {list(TRAINING_KINDS)}, got {objective!r}", None
        )
    return tuple(FIELDS[objective])


def as_records(data: Any, objective: str, name: str = "train_data") -> list[Record]:
    """Validate in-memory training records and return clean copies holding exactly the objective's fields.

    Args:
        data: a list of dicts or a `datasets.Dataset`.
        objective: "sft" (fields prompt, completion) or "dpo" (prompt, chosen, rejected).
        name: what to call `data` in error messages.

    Returns:
        The records, checked by `validate_record` (a missing field, a non-string value, an empty
        completion) and non-empty; any problem raises `DataError` naming `name`, the index and the field.

    Example:
        >>> as_records([{"prompt": "1+1=", "completion": "2", "id": 7}], "sft")
        [{'prompt': '1+1=', 'completion': '2'}]
        >>> as_records([{"prompt": "a", "completion": ""}], "sft")
        Traceback (most recent call last):
        ...
        lofit.errors.DataError: train_data, index 0, field 'completion': is empty. Fix: give a non-empty value.
    """
    fields = objective_fields(objective)
    if data is None or isinstance(data, (str, bytes, Mapping)):
        raise DataError(
            None,
            None,
            None,
            f"{name} must be a list of dicts or a datasets.Dataset with fields {list(fields)}, "
            f"got {type(data).__name__}",
        )
    rows: Iterable[Any] = data
    records = [validate_record(row, objective, Where(name, index, "index")) for index, row in enumerate(rows)]
    if not records:
        raise DataError(None, None, None, f"{name} is empty; training needs at least one {objective} record")
    return records


def train_val_records(
    train_data: Any, val_data: Any, objective: str
) -> tuple[list[Record], list[Record] | None]:
    """Validated training records, and validation records (None when `val_data` is None or empty).

    Example:
        >>> train_val_records([{"prompt": "a", "completion": "b"}], [], "sft")
        ([{'prompt': 'a', 'completion': 'b'}], None)
    """
    records = as_records(train_data, objective, "train_data")
    has_val = val_data is not None and len(val_data)
    return records, as_records(val_data, objective, "val_data") if has_val else None


def text_problem(text: str) -> tuple[str, str] | None:
    """Why `text` cannot be tokenised as written, and the fix; None when it can.

    A NUL byte (which a CSV cell or a JSON "\\u0000" can carry) and a lone UTF-16 surrogate (a JSON
    "\\ud800" without its pair) are refused: tokenizers reject the one and silently mangle the other.

    Example:
        >>> text_problem("fine") is None
        True
        >>> text_problem("a\\ud800b")[0]
        'holds a lone UTF-16 surrogate (U+D800) at character 1'
    """
    nul = text.find("\x00")
    if nul >= 0:
        return f"holds a NUL byte at character {nul}", "remove the NUL byte (\\u0000) from the text"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        return (
            f"holds a lone UTF-16 surrogate (U+{code:04X}) at character {error.start}",
            "write the character itself, or as a complete \\uXXXX\\uXXXX surrogate pair in JSON",
        )
    return None


def _check_text(value: str, name: str, where: Where, entry: int | None = None) -> None:
    problem = text_problem(value)
    if problem is not None:
        prefix = "" if entry is None else f"entry {entry} "
        raise where.error(name, prefix + problem[0], problem[1])


def _check_distinct(clean: Record, kind: str, where: Where) -> None:
    """No two choices alike, no answer both correct and incorrect, no DPO pair of one response."""
    if kind == "mc":
        seen: dict[str, int] = {}
        for index, choice in enumerate(clean["choices"]):
            key = choice.strip()
            if key in seen:
                raise where.error(
                    "choices",
                    f"choices {seen[key]} and {index} are the same text ({_describe(choice)})",
                    "give every choice once (a repeated choice makes the prediction arbitrary)",
                )
            seen[key] = index
    elif kind == "truthfulqa_mc":
        correct = {_reference_key(a) for a in clean["correct_answers"]}
        both = [a for a in clean["incorrect_answers"] if _reference_key(a) in correct]
        if both:
            raise where.error(
                "incorrect_answers",
                f"{_describe(both[0])} is listed as correct and as incorrect",
                "keep each answer in one of the two lists",
            )
    elif kind == "dpo" and clean["chosen"] == clean["rejected"]:
        raise where.error(
            "rejected",
            "is the same text as 'chosen'",
            "give a rejected response that differs from the chosen one (the pair teaches nothing)",
        )


def _reference_key(answer: str) -> str:
    """An answer as TruthfulQA's MC scoring compares it: stripped, closed with a period."""
    answer = answer.strip()
    return answer if answer.endswith(".") else answer + "."


def _check_value(value: Any, name: str, ftype: str, where: Where) -> Any:
    if ftype in ("text", "nonempty"):
        if not isinstance(value, str):
            raise where.error(name, f"must be a string, got {_describe(value)}", "write the value as text")
        if ftype == "nonempty" and not value.strip():
            raise where.error(name, "is empty", "give a non-empty value")
        _check_text(value, name, where)
        return value
    if ftype == "list":
        items = _parse_list(value, name, where) if where.text_cells and isinstance(value, str) else value
        if not isinstance(items, list):
            raise where.error(
                name,
                f"must be a list of strings, got {_describe(value)}",
                f'write it as a JSON array, e.g. ["first", "second"]{_csv_hint(where)}',
            )
        if not items:
            need = "at least two choices" if name == "choices" else "at least one entry"
            raise where.error(name, "is an empty list", f"give {need}")
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise where.error(name, f"entry {i} must be a string, got {_describe(item)}", None)
            if not item.strip():
                raise where.error(name, f"entry {i} is empty", "remove it or give its text")
            _check_text(item, name, where, i)
        return list(items)
    # "index"
    if where.text_cells and isinstance(value, str) and _INT_TEXT.match(value):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(
            name,
            f"must be an integer, got {_describe(value)}",
            "give the 0-based index of the correct choice",
        )
    return value


def _parse_list(cell: str, name: str, where: Where) -> Any:
    """A CSV list cell: a JSON array, or entries separated by ";" (surrounding spaces stripped)."""
    text = cell.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise where.error(
                name, f"starts with '[' but is not a valid JSON array ({exc.msg})", "fix the JSON array"
            ) from None
        except RecursionError:
            raise where.error(
                name, "the JSON array is nested too deeply", "give a flat list of strings"
            ) from None
    if not text:
        return []
    return [part.strip() for part in text.split(";")]


def _csv_hint(where: Where) -> str:
    return ', or in CSV as "first; second"' if where.text_cells else ""


def _describe(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, list, dict)) else repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _example(kind: str) -> str:
    examples = {
        "sft": '{"prompt": "Q: 2+2? A:", "completion": " 4"}',
        "dpo": '{"prompt": "Q: ... A:", "chosen": "...", "rejected": "..."}',
        "truthfulqa_mc": '{"question": "...", "best_answer": "...", "correct_answers": ["..."], '
        '"incorrect_answers": ["..."]}',
        "mc": '{"question": "...", "choices": ["a", "b"], "answer": 0}',
        "exact_match": '{"prompt": "...", "answers": ["..."]}',
    }
    return examples[kind]
