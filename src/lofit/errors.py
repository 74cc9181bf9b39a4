"""The errors lofit raises for input a user can fix.

Every such error derives from `LofitError`; the command line turns exactly these (and `OSError`) into a
one-paragraph message with exit code 2. Anything else escaping lofit is a bug ("internal error", exit 1).
The classes also derive from the builtin a caller would expect (`ValueError`, `RuntimeError`), so code
written against the builtins keeps working.

Example:
    >>> from lofit.errors import LofitError, LofitValueError
    >>> issubclass(LofitValueError, (LofitError, ValueError))
    True
"""

from __future__ import annotations


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
