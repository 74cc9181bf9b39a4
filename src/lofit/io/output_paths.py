"""Checks on the paths a command reads and writes: inputs exist and are what they claim to be, outputs never
overlap inputs, output directories are writable. Imports no torch.

A command's output may not be, contain, or lie inside any of its inputs (symlinks resolved): `lofit merge
--model M --out M` would overwrite the base model's weights, `lofit eval --test T --out T` the test data.

Example:
    >>> from lofit.io.output_paths import check_output_apart
    >>> check_output_apart("runs/new", {"--train": "data/train.jsonl"}, option="--out")
    >>> check_output_apart("data", {"--train": "data/train.jsonl"}, option="--out")
    Traceback (most recent call last):
    ...
    lofit.errors.LofitValueError: --out data contains the input --train data/train.jsonl; lofit never writes where it reads. Choose an --out outside every input
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ..errors import LofitValueError
from .atomic import LinkedOutputError

PathLike = str | os.PathLike[str]


REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # the shape of a Hub repo id ("org/name")


def _resolved(path: PathLike) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare the path as written
        return Path(os.path.abspath(Path(path).expanduser()))


def check_output_apart(out: PathLike, inputs: Mapping[str, PathLike | None], option: str = "--out") -> None:
    """Refuse an output path that is, contains or lies inside one of the inputs (symlinks resolved).

    Args:
        out: the output file or directory.
        inputs: option name -> input path (None entries are skipped), e.g. `{"--model": "m/"}`.
        option: the output's option name, for the message.

    Raises:
        LofitValueError: naming the output, the input and the fix.
    """
    target = _resolved(out)
    for name, path in inputs.items():
        if path is None:
            continue
        source = _resolved(path)
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents:
            relation = "lies inside"
        else:
            continue
        raise LofitValueError(
            f"{option} {out} {relation} the input {name} {path}; lofit never writes where it reads. "
            f"Choose an {option} outside every input"
        )


def check_no_links(out: PathLike, names: tuple[str, ...], option: str = "--out") -> None:
    """Refuse an output folder where a path lofit will write (`out/NAME`) is a symbolic link.

    Checked before any work, so a command fails at once rather than after training; the write layer
    (`lofit.io.atomic.output_target`) checks every write again.

    Args:
        out: the output folder.
        names: the files and folders the command writes in it, relative to `out` (e.g. "adapter", "train/checkpoints").
        option: the output's option name, for the message.

    Raises:
        LinkedOutputError: naming the link, its destination and the fix.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp())
        >>> (out / "heads.json").symlink_to(out / "elsewhere.json")
        >>> check_no_links(out, ("adapter", "heads.json"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lofit.io.atomic.LinkedOutputError: --out ...: heads.json is a symbolic link (to ...elsewhere.json); lofit writes heads.json there and never through a link, since that would replace what it points to. Remove the link or choose another --out
    """
    for name in names:
        for part in (*reversed(Path(name).parents[:-1]), Path(name)):  # "train", then "train/checkpoints"
            linked = Path(out) / part
            if linked.is_symlink():
                raise LinkedOutputError(
                    f"{option} {out}: {part} is a symbolic link (to {os.readlink(linked)}); lofit writes "
                    f"{name} there and never through a link, since that would replace what it points to. "
                    f"Remove the link or choose another {option}"
                )


def describe_not_regular(path: Path) -> str | None:
    """Why `path` cannot be read as a regular file, or None if it can.

    Args:
        path: the path to check.

    Returns:
        A short problem text ("is a directory, not a file", "is a FIFO (named pipe) ...", "is a symlink
        loop", "is a broken symlink ...", "does not exist") or None for a readable regular file.
    """
    try:
        mode = path.stat().st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symlink loop (a link that points back to itself)"
        if path.is_symlink():
            return f"is a broken symlink (it points to {os.readlink(path)}, which does not exist)"
        if error.errno in (errno.EACCES, errno.EPERM):
            return "cannot be read (permission denied)"
        return "does not exist"
    except RuntimeError:
        return "is a symlink loop (a link that points back to itself)"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a regular file; lofit reads files it can read twice"
    if not stat.S_ISREG(mode):
        return "is a device or socket, not a regular file"
    return None


def check_input_file(path: PathLike, option: str) -> Path:
    """Refuse an input that is not a readable regular file, naming the option and why.

    Args:
        path: the file given on the command line.
        option: its option name (`--heads`, ...).

    Returns:
        The path as a `Path`.

    Raises:
        LofitValueError: the path is missing, a directory, a FIFO, a device, a symlink loop or unreadable.
    """
    path = Path(path)
    problem = describe_not_regular(path)
    if problem is not None:
        raise LofitValueError(f"{option} {path}: {problem}; pass an existing regular file")
    return path


def check_input_dir(path: PathLike, option: str, needs: str) -> Path:
    """Refuse an input directory that does not exist or is not a directory.

    Args:
        path: the directory given on the command line.
        option: its option name (`--adapter`, ...).
        needs: what it should hold, for the message ("lofit_config.json and lofit_model.safetensors").

    Returns:
        The path as a `Path`.

    Raises:
        LofitValueError: naming the option, what is wrong and what the directory should hold.
    """
    path = Path(path)
    try:
        is_dir = stat.S_ISDIR(path.stat().st_mode)
    except (OSError, RuntimeError):
        problem = describe_not_regular(path) or "cannot be read"
        first = needs.split()[0]
        raise LofitValueError(
            f"{option} {path}: {problem} ({first} not found); pass a directory holding {needs}"
        ) from None
    if not is_dir:
        raise LofitValueError(
            f"{option} {path}: is a file, not a directory; pass a directory holding {needs}"
        )
    return path


def check_output_dir(out: PathLike, option: str = "--out") -> None:
    """Fail at once, not after training, when the output directory cannot be created or written.

    Args:
        out: the output directory (created if missing).
        option: its option name, for the message.

    Raises:
        OSError: naming the directory and the system's reason ("cannot write to the output directory ...").
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise OSError(
            error.errno,
            f"cannot write to the output directory {out}: {error.strerror}; choose another {option}",
        ) from None


def is_hub_adapter(path: PathLike) -> bool:
    """Whether `--adapter` names a Hub repo id ("org/name") rather than a local folder (which always wins).

    Args:
        path: the `--adapter` value.

    Returns:
        True when nothing exists at `path` and it has the shape of a repo id.

    Example:
        >>> is_hub_adapter("org/surely-not-a-local-folder"), is_hub_adapter("./runs/adapter")
        (True, False)
    """
    text = os.fspath(path)
    return (
        not Path(text).expanduser().exists()
        and bool(REPO_ID.match(text))
        and not text.startswith(".")
        and ".." not in text
    )
