"""One writer per output: a command holds a lock on its `--out` for as long as it runs.

The lock is an flock(2) on a hidden file beside the output, `.NAME.lofit-lock`, which also records who holds
it (pid, host, command, start time). A second command on the same output fails at once with
`OutputLockedError` naming that process; the kernel drops the flock when its holder dies however it dies,
so the lock of a killed process is free and simply taken over (with a warning) — no stale lock to delete by
hand. Taking the lock also cleans up what a crashed write left in the output (see `lofit.io.atomic`).

The lock file sits beside the output, not inside it, because some outputs (a merged checkpoint) are
replaced whole. It is removed when the lock is released. Within one process the lock is re-entrant.
Limits: flock is advisory (only lofit honours it) and may not exclude processes on other hosts of a
network filesystem without working flock.

Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> with output_lock(out):
    ...     with output_lock(out):  # re-entrant within a process
    ...         holder(out)["pid"] == os.getpid()
    True
    >>> holder(out) is None
    True
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shlex
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import LofitRuntimeError
from .atomic import LinkedOutputError, recover, remove_leftovers

try:
    import fcntl
except ImportError:  # Windows: no flock, no lock
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)
LOCK_SUFFIX = ".lofit-lock"

_held: dict[Path, list[int]] = {}  # lock file -> [descriptor, depth] of the locks this process holds
_held_guard = threading.Lock()


class OutputLockedError(LofitRuntimeError):
    """Another running process is writing the same output; the message names it."""


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The lock file of output `path`: `.NAME.lofit-lock` in the same folder (symlinks resolved)."""
    target = Path(os.path.realpath(os.fspath(path)))
    return target.parent / f".{target.name or 'root'}{LOCK_SUFFIX}"


def holder(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Who holds the lock of output `path` (pid, host, command, since), or None (for diagnostics).

    Reads the lock file without locking it (so it never disturbs a process taking the lock); a record left
    by a dead process of this host counts as free.
    """
    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        info = _read_info(fd)
    finally:
        os.close(fd)
    if info is None or info.get("host") != socket.gethostname():
        return info
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)  # signal 0: only asks whether it exists
    except (ProcessLookupError, OverflowError):
        return None
    except PermissionError:  # alive, another user's
        pass
    return info


def _read_info(fd: int) -> dict[str, Any] | None:
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _command() -> str:
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program in ("__main__.py", "lofit"):
        return shlex.join(["lofit", *sys.argv[1:]])
    return shlex.join([program, *sys.argv[1:]])


def _locked_message(path: str | os.PathLike[str], info: dict[str, Any] | None) -> str:
    if not info:
        who = "another process (it is starting up)"
    else:
        who = (
            f"process {info.get('pid')} on {info.get('host')} (`{info.get('command')}`, "
            f"running since {info.get('since')})"
        )
    return (
        f"{path} is being written by {who}; wait for it to finish, stop it, or choose another output "
        "path. Two commands writing one output would overwrite each other's files"
    )


def _acquire(path: str | os.PathLike[str], lock: Path) -> int:
    """Take the flock of `lock` (retrying if the file was replaced meanwhile); return its descriptor."""
    assert fcntl is not None
    while True:
        if lock.is_symlink():  # writing the record through it would overwrite what it points to
            raise LinkedOutputError(
                f"{lock} (the lock file of {path}) is a symbolic link (to {os.readlink(lock)}); lofit never "
                "writes through a link. Remove the link"
            )
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(fd)
            os.close(fd)
            raise OutputLockedError(_locked_message(path, info)) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:  # released (and removed) by its holder between our open and flock
            same = False
        if same:
            return fd
        os.close(fd)


def _claim(path: str | os.PathLike[str], lock: Path) -> int:
    fd = _acquire(path, lock)
    stale = _read_info(fd)
    if stale and stale.get("pid") != os.getpid():
        logger.warning(
            "%s: took over the lock left by process %s on %s (`%s`), which is no longer running",
            path,
            stale.get("pid"),
            stale.get("host"),
            stale.get("command"),
        )
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": _command(),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
    os.fsync(fd)
    return fd


def _claim_creating(path: str | os.PathLike[str], lock: Path) -> int:
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        return _claim(path, lock)
    except OSError as error:
        raise OSError(
            error.errno,
            f"cannot write to the output directory {lock.parent} (to lock {path}): {error.strerror}; "
            "choose another --out",
        ) from None


@contextlib.contextmanager
def output_lock(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the lock of the output `path` (a folder or a file) while the block runs.

    On entry, leftovers of crashed writes in and beside `path` are cleaned up (see `lofit.io.atomic.recover`).

    Args:
        path: the output a command writes (its `--out`); it need not exist yet.

    Returns:
        A context manager yielding the lock file's path.

    Raises:
        OutputLockedError: another running process holds the lock; the message names it.
    """
    lock = lock_path(path)
    if fcntl is None:
        yield lock
        return
    with _held_guard:
        entry = _held.get(lock)
        if entry is not None:
            entry[1] += 1
        else:
            _held[lock] = [_claim_creating(path, lock), 1]
    try:
        if entry is None:
            recover(path)
            remove_leftovers(path)
        yield lock
    finally:
        with _held_guard:
            entry = _held[lock]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[lock]
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()  # while still holding the flock: see the inode check in _acquire
                os.close(entry[0])


def _below_a_file(path: Path) -> bool:
    """Whether the nearest existing folder above `path` is in fact a file (no lock can be placed there)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return not parent.is_dir()
    return False


def with_output_lock(handler: Callable[[Any], int]) -> Callable[[Any], int]:
    """Wrap a CLI command handler so that it runs holding the lock of `args.out` (if it has one).

    Args:
        handler: a function of the parsed arguments, returning the exit code.

    Returns:
        The wrapped handler.
    """

    def locked(args: Any) -> int:
        out = getattr(args, "out", None)
        if out is None or _below_a_file(Path(out)):  # the command's own check explains that case
            return handler(args)
        with output_lock(out):
            return handler(args)

    return locked
