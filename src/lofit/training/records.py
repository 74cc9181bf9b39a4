"""Training records: check that every record has the fields its objective needs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import LofitValueError

OBJECTIVE_FIELDS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "dpo": ("prompt", "chosen", "rejected"),
}

Record = dict[str, str]


class RecordError(LofitValueError):
    """A training record is malformed; the message names the record and the field to fix."""


def objective_fields(objective: str) -> tuple[str, ...]:
    """The record fields of the objective named `objective` ("sft" or "dpo").

    Example:
        >>> objective_fields("dpo")
        ('prompt', 'chosen', 'rejected')
    """
    if objective not in OBJECTIVE_FIELDS:
        raise LofitValueError(f"objective must be one of {sorted(OBJECTIVE_FIELDS)}, got {objective!r}")
    return OBJECTIVE_FIELDS[objective]


def as_records(data: Any, objective: str, name: str = "train_data") -> list[Record]:
    """Validate `data` and return it as a list of dicts holding exactly the objective's fields.

    Args:
        data: a list of dicts or a `datasets.Dataset`.
        objective: "sft" (fields prompt, completion) or "dpo" (prompt, chosen, rejected).
        name: what to call `data` in error messages.

    Returns:
        The records; a missing field, a non-string value or an empty `data` raises `RecordError`.

    Example:
        >>> as_records([{"prompt": "1+1=", "completion": "2", "id": 7}], "sft")
        [{'prompt': '1+1=', 'completion': '2'}]
    """
    fields = objective_fields(objective)
    if data is None or isinstance(data, (str, bytes, Mapping)):
        raise RecordError(
            f"{name} must be a list of dicts or a datasets.Dataset with fields {list(fields)}, "
            f"got {type(data).__name__}"
        )
    rows: Iterable[Any] = data
    records = [_record(row, index, fields, objective, name) for index, row in enumerate(rows)]
    if not records:
        raise RecordError(f"{name} is empty; training needs at least one {objective} record")
    return records


def _record(row: Any, index: int, fields: tuple[str, ...], objective: str, name: str) -> Record:
    if not isinstance(row, Mapping):
        raise RecordError(f"{name}[{index}] is a {type(row).__name__}, not a dict with fields {list(fields)}")
    record = {}
    for key in fields:
        if key not in row:
            raise RecordError(
                f"{name}[{index}] has no field {key!r}; {objective} records need fields {list(fields)}"
            )
        value = row[key]
        if not isinstance(value, str):
            raise RecordError(f"{name}[{index}][{key!r}] must be a string, got {type(value).__name__}")
        record[key] = value
    return record


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
