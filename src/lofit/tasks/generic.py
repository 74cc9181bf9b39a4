"""Load user records from files (jsonl, json, csv), in-memory lists, `datasets.Dataset`s or the HF hub.

>>> load_records([{"prompt": "2+2=", "completion": " 4"}])
[{'prompt': '2+2=', 'completion': ' 4'}]
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError
from .readers import RawRow, read_rows
from .records import Record, RecordKind, Where, detect_or_fail, require_kind, validate_record

Source = Any  # str | Path (file or "hf:owner/name[:config]") | list[dict] | datasets.Dataset


def load_records(source: Source, kind: str | None = None, *, split: str | None = None) -> list[Record]:
    """Read and validate records from a file, a Hugging Face dataset or a list of dicts.

    Args:
        source: a .jsonl/.json/.csv path, "hf:owner/name[:config]" (a hub dataset; needs `split` and a
            connection), a `datasets.Dataset`, or a list of dicts.
        kind: the record format ("sft", "dpo", "truthfulqa_mc", "mc", "exact_match"); None detects it from
            the first record's fields.
        split: the hub dataset's split.

    Returns:
        Clean records holding exactly their format's fields.

    Raises:
        DataError: the first problem, naming the file, line and field.

    Example:
        >>> load_records([{"prompt": "2+2=", "completion": "4", "note": "dropped"}])
        [{'prompt': '2+2=', 'completion': '4'}]
    """
    return load_records_with_kind(source, kind, split=split)[1]


def load_records_with_kind(
    source: Source, kind: str | None = None, *, split: str | None = None
) -> tuple[RecordKind, list[Record]]:
    """Like `load_records`, also returning the (given or detected) record format.

    Returns:
        `(kind, records)`.
    """
    rows = raw_rows(source, split=split)
    if not rows:
        raise DataError(describe_source(source), None, None, "holds no records", "add at least one record")
    if kind is None:
        first = rows[0]
        if not isinstance(first.data, Mapping):
            raise first.where.error(
                None,
                f"expected a record (a JSON object), got {type(first.data).__name__}",
                "write each record as an object with the fields of one record format",
            )
        kind = detect_or_fail(first.data, first.where)
    checked = require_kind(kind)
    return checked, [validate_record(row.data, checked, row.where) for row in rows]


def raw_rows(source: Source, *, split: str | None = None) -> list[RawRow]:
    """The unvalidated rows of any accepted source, each with its location (file and line)."""
    if isinstance(source, (str, Path)):
        text = str(source)
        if text.startswith("hf:"):
            return _hub_rows(text[3:], split)
        return read_rows(Path(text).expanduser())
    if _is_hf_dataset(source):
        label = describe_source(source)
        return [RawRow(dict(row), Where(label, i, "record")) for i, row in enumerate(source, start=1)]
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        label = describe_source(source)
        return [RawRow(row, Where(label, i, "record")) for i, row in enumerate(source, start=1)]
    raise DataError(
        None,
        None,
        None,
        f"cannot read records from a {type(source).__name__}",
        "pass a file path, a list of dicts or a datasets.Dataset",
    )


def describe_source(source: Source) -> str:
    """How error messages name `source`: its path, "<datasets.Dataset>" or "<list of records>"."""
    if isinstance(source, (str, Path)):
        return str(source)
    if _is_hf_dataset(source):
        return "<datasets.Dataset>"
    return "<list of records>"


def _is_hf_dataset(obj: Any) -> bool:
    # Only check when `datasets` is already imported: a Dataset cannot exist otherwise, and importing the
    # library just for this check would cost seconds.
    module = sys.modules.get("datasets")
    return module is not None and isinstance(obj, module.Dataset)


def _hub_rows(name: str, split: str | None) -> list[RawRow]:
    """Rows of a Hugging Face hub dataset (cannot be exercised offline)."""
    repo, _, config = name.partition(":")
    label = f"hf:{name}" + (f" [{split}]" if split else "")
    if not repo or split is None:
        raise DataError(
            label,
            None,
            None,
            "a hub dataset needs a name and a split",
            'use "hf:owner/name" (or "hf:owner/name:config") and pass split="train" (or --split)',
        )
    try:
        import datasets

        dataset = datasets.load_dataset(repo, config or None, split=split)
    except Exception as exc:  # network, missing dataset, bad split: all end as one user-facing error
        raise DataError(
            label, None, None, f"could not load the dataset ({type(exc).__name__}: {exc})", None
        ) from exc
    return [RawRow(dict(row), Where(label, i, "row")) for i, row in enumerate(dataset, start=1)]
