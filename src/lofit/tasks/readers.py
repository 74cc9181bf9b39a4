"""Read jsonl, json and csv files into raw rows that remember their 1-based line, for error messages."""

from __future__ import annotations

import bisect
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io.output_paths import describe_not_regular
from .records import Where

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
_WS = " \t\r\n"


@dataclass(frozen=True)
class RawRow:
    """One record as read from a file (not yet validated) and where it starts."""

    data: Any
    where: Where


def file_format(path: Path) -> str:
    """The format ("jsonl", "json" or "csv") of a data file, by its suffix; DataError for any other."""
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            path,
            None,
            None,
            f"unsupported file type {path.suffix or '(no suffix)'!r}",
            "give a .jsonl, .json or .csv file",
        )
    return fmt


def read_rows(path: str | Path, *, allow_empty: bool = False) -> list[RawRow]:
    """Parse a data file (format by suffix) into raw rows that remember their 1-based line.

    Args:
        path: a .jsonl, .ndjson, .json or .csv file.
        allow_empty: return [] for a file without records instead of raising.

    Returns:
        The rows, not yet validated.

    Raises:
        DataError: an unreadable, malformed or (unless allowed) empty file, naming the file and line.
    """
    path = Path(path)
    fmt = file_format(path)
    text = read_text(path)
    if fmt == "jsonl":
        rows = _jsonl_rows(text, str(path))
    elif fmt == "json":
        rows = _json_rows(text, str(path))
    else:
        rows = _csv_rows(text, str(path))
    if not rows and not allow_empty:
        raise DataError(path, 1, None, "the file holds no records", "add at least one record")
    return rows


def read_text(path: Path) -> str:
    """The UTF-8 text of a data file; a missing path, directory, FIFO or symlink loop gets its own message.

    Args:
        path: the data file.

    Returns:
        Its text (a byte-order mark dropped).

    Raises:
        DataError: naming the file, and the line of the first byte that is not UTF-8.
    """
    problem = describe_not_regular(path)
    if problem is not None:
        if problem == "does not exist":
            raise DataError(path, None, None, "file not found", "check the path")
        raise DataError(path, None, None, problem, "give a regular .jsonl, .json or .csv file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # tolerate a byte-order mark (TruthfulQA.csv has one)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(path, line, None, "the file is not UTF-8 text", "save it as UTF-8") from None


def _loads(text: str, source: str, line: int | None) -> Any:
    """`json.loads` that refuses duplicate keys and nesting too deep for Python, naming the file."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise DataError(
                    source, line, key, "this key appears twice in one object", "keep one of the two values"
                )
            seen[key] = value
        return seen

    try:
        return json.loads(text, object_pairs_hook=unique)
    except RecursionError:
        raise DataError(
            source,
            line,
            None,
            "the JSON is nested too deeply (thousands of [ or { inside each other)",
            "records are flat objects of strings, lists of strings and integers",
        ) from None


def _jsonl_rows(text: str, source: str) -> list[RawRow]:
    # JSON Lines end lines with \n only: U+2028, U+0085 and friends are valid inside JSON strings, so
    # str.splitlines() would cut records apart.
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip(_WS):
            continue
        try:
            value = _loads(line, source, number)
        except json.JSONDecodeError as exc:
            raise DataError(
                source,
                number,
                None,
                f"invalid JSON ({exc.msg} at column {exc.colno})",
                "write one complete JSON object per line",
            ) from None
        rows.append(RawRow(value, Where(source, number)))
    return rows


def _json_rows(text: str, source: str) -> list[RawRow]:
    """A JSON array of records, or an object whose "data" member is that array."""
    try:
        top = _loads(text, source, None) if text.strip(_WS) else None
    except json.JSONDecodeError as exc:
        raise DataError(
            source, exc.lineno, None, f"invalid JSON ({exc.msg} at column {exc.colno})", "fix the JSON syntax"
        ) from None
    if top is None:
        return []
    # json.loads gives no positions, so walk the (already valid) text once more to find where each
    # record starts.
    if isinstance(top, list):
        start = _skip_ws(text, 0)
    elif isinstance(top, dict) and isinstance(top.get("data"), list):
        start = _member_offset(text, "data")
    else:
        raise DataError(
            source,
            1,
            None,
            'a .json file must hold a list of records or an object {"data": [...]}',
            "wrap the records in a JSON array",
        )
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]
    decoder = json.JSONDecoder()
    rows = []
    i = _skip_ws(text, start + 1)
    while text[i] != "]":
        value, end = decoder.raw_decode(text, i)
        rows.append(RawRow(value, Where(source, bisect.bisect_left(newlines, i) + 1)))
        i = _skip_ws(text, end)
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
    return rows


def _member_offset(text: str, wanted: str) -> int:
    """Offset of the value of top-level member `wanted` in a valid JSON object text."""
    decoder = json.JSONDecoder()
    i = _skip_ws(text, _skip_ws(text, 0) + 1)
    while True:
        key, i = decoder.raw_decode(text, i)
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past ':'
        if key == wanted:
            return i
        _, i = decoder.raw_decode(text, i)
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past ','


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _csv_rows(text: str, source: str) -> list[RawRow]:
    # The csv module refuses cells over 128 KiB by default; long prompts (stories, few-shot) are normal.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows = []
    previous_end = 0
    try:
        for cells in reader:
            start, previous_end = previous_end + 1, reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                _check_header(header, source, start)
                continue
            if len(cells) > len(header):
                raise DataError(
                    source,
                    start,
                    None,
                    f"the row has {len(cells)} cells but the header has {len(header)} columns",
                    "quote cells that contain commas",
                )
            rows.append(RawRow(dict(zip(header, cells, strict=False)), Where(source, start, text_cells=True)))
    except csv.Error as exc:
        raise DataError(source, reader.line_num, None, f"unreadable CSV ({exc})", "fix the quoting") from None
    return rows


def _check_header(header: list[str], source: str, line: int) -> None:
    seen: set[str] = set()
    for name in header:
        if not name:
            raise DataError(source, line, None, "the header has an empty column name", "name every column")
        if name in seen:
            raise DataError(source, line, name, "the header names this column twice", "rename one of them")
        seen.add(name)
