"""The errors lofit raises for input a user can fix.

Every such error derives from `LofitError`; the command line turns exactly these (and `OSError`) into a
one-paragraph message with exit code 2. Anything else escaping lofit is a bug ("internal error", exit 1).
The classes also derive from the builtin a caller would expect (`ValueError`, `RuntimeError`), so code
written against the builtins keeps working. This is the one errors module: every layer's error classes
derive from these, and `DataError` (bad task data, naming the file, line and field) lives here too.

Example:
    >>> from lofit.errors import LofitError, LofitValueError
    >>> issubclass(LofitValueError, (LofitError, ValueError))
    True
"""

from __future__ import annotations

from pathlib import Path


class LofitError(Exception):
    """Base class of every error lofit raises for bad input or an impossible request."""


class LofitValueError(LofitError, ValueError):
    """A value (option, record, file content, config field) is invalid; the message says what to change."""


class LofitRuntimeError(LofitError, RuntimeError):
    """A request that cannot be carried out in this environment or state (e.g. training diverged)."""


class AdapterLoadError(LofitValueError):
    """A saved adapter cannot be used; the message names the file and what is wrong."""


class BaseModelMismatchError(AdapterLoadError):
    """The adapter was trained for a different base model."""


class ModelLoadError(LofitRuntimeError):
    """A model could not be loaded; the message says what to install, pass or delete."""


class NotPeftError(LofitError, TypeError):
    """A lofit object was handed to PEFT, TRL or transformers' PEFT integration; the message names lofit's call."""


class DataError(LofitValueError):
    """Malformed or missing task data.

    The message reads "FILE, line N, field 'F': what is wrong. Fix: what to change." The parts are also
    available as attributes (`source`, `line`, `field`, `problem`, `fix`) for callers that format their own
    message (the CLI prints `str(error)` as its one-paragraph error).

    >>> str(DataError("bad.jsonl", 3, "answer", "4 is out of range for 3 choices", "use 0, 1 or 2"))
    "bad.jsonl, line 3, field 'answer': 4 is out of range for 3 choices. Fix: use 0, 1 or 2."
    """

    def __init__(
        self,
        source: str | Path | None,
        line: int | None,
        field: str | None,
        problem: str,
        fix: str | None = None,
        *,
        line_label: str = "line",
    ) -> None:
        self.source = None if source is None else str(source)
        self.line = line
        self.field = field
        self.problem = problem
        self.fix = fix
        self.line_label = line_label
        super().__init__(self._message())

    def _message(self) -> str:
        where = [] if self.source is None else [self.source]
        if self.line is not None:
            where.append(f"{self.line_label} {self.line}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        text = self.problem.rstrip(".") + "."
        if where:
            text = f"{', '.join(where)}: {text}"
        if self.fix:
            text += f" Fix: {self.fix.rstrip('.')}."
        return text

    def __reduce__(self) -> tuple[object, ...]:  # keep pickling (multiprocessing) working
        return (
            _rebuild,
            (self.source, self.line, self.field, self.problem, self.fix, self.line_label),
        )


def _rebuild(
    source: str | None, line: int | None, field: str | None, problem: str, fix: str | None, line_label: str
) -> DataError:
    return DataError(source, line, field, problem, fix, line_label=line_label)
