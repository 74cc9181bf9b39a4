"""Write files and folders so that a kill at any moment leaves the complete old or the complete new content,
never through a symbolic link, never over an input, and never deleting a file lofit did not write.

Files (`atomic_path`, `atomic_write_text`, `atomic_write_json`, `atomic_write_with`) are written to a hidden
temporary file beside the target (`.NAME.lofit-tmp-PID-XXXXXXXX`), fsynced and renamed over it: rename(2) is
atomic, so readers see the old file or the new one.

Folders (`atomic_directory`: adapters, merged checkpoints, training checkpoints, the bundled-model cache)
are built completely in a hidden temporary folder beside the target, fsynced, and swapped in whole. What the
old folder held that the new content lacks depends on the folder's `policy`:

- "beside" (adapters, as PEFT's `save_pretrained`): the writer owns only the names it writes; every other
  entry of the old folder (a base model saved there, a user's notes) is carried over into the new folder by
  hard links (copies where links fail) before the swap, so saving an adapter next to a model keeps the model.
- "model" (merged checkpoints): the folder is a whole model. A manifest (`.lofit-manifest.json`) records
  the files lofit wrote; those are replaced (no old shard survives beside a new checkpoint). Model content
  lofit did not write (`CONTENT_PATTERNS`: weights, configs, tokenizer files, ...: another model) is never
  replaced silently: `ForeignContentError` unless `overwrite=True` (`--overwrite`). Other files (notes) are
  carried over.
- "own" (checkpoints, caches: folders only lofit writes): content is replaced, other files carried over.

The swap itself:

- target absent: one rename(2);
- target present, Linux: renameat2(RENAME_EXCHANGE) swaps the two folders in one atomic step; the old
  content, now under the temporary name, is deleted afterwards;
- target present elsewhere (or on a filesystem without RENAME_EXCHANGE): target -> `.NAME.lofit-old-PID-X`,
  then temporary -> target, then the backup is deleted. A kill between the two renames leaves no target
  but a complete backup: `recover(target)` renames the backup back. Every lofit writer runs it before
  writing `target`, and lofit's readers (adapter, checkpoint) run it when `target` is missing.

Links and inputs: a target that is a symbolic link is refused (`LinkedOutputError`): writing through it would
replace the link's destination (a model, a data file). Folders above the target are resolved, so `--out`
given through a link to a folder works. While `write_guard` is active (every CLI command runs in one), each
write is also checked against the command's inputs after resolving links (`InputOverwriteError`), and no
folder between the output root and the target may be a link.

A run's output folder (`lofit run/select/train --out`) is not replaced whole, since it keeps the
checkpoints a `--resume` continues from: each artefact in it is (`adapter/`, `heads.json`, `heads.png`,
`metrics.json`, `report.md`, each checkpoint), while the command holds the lock on it (`lofit.io.locking`).

Swaps and recoveries of one folder hold an exclusive flock(2) on its parent folder, so two writers (or a
writer and a recovery) never interleave their renames. A temporary file or folder is flocked by the process
building it, so the cleanup of a crashed write (`remove_leftovers`, run on the next write of that target
and when a command takes the lock on its output folder) deletes only the leftovers of dead processes. Every
name lofit leaves behind carries the marker `.lofit-tmp-`, `.lofit-old-` or `.lofit-removing-` followed by
a process id and 8 random characters (`is_leftover`); nothing else is ever touched, so a user's own files in
an output folder (`.notes.20240101.tmp`) are safe.

Write errors: a full disk, a quota, a read-only filesystem or a size limit raise `OSError` naming the path,
also where a library reports them in its own exception type (safetensors, tokenizers): the command line
turns them into exit code 2.

Limits: the guarantee is about kills (SIGKILL, OOM, a crash) and errors (a full disk): a power loss is
covered as far as the filesystem honours fsync of files and folders. In the two-rename fallback the target
is absent for the moment between the renames: a program other than lofit (plain `from_pretrained`) that
reads it then finds nothing until the next lofit command restores it. Locks are advisory and local: on
network filesystems without working flock(2) concurrent writers are not excluded. The link checks see the
paths as they are when the write starts; a link swapped in by another program during the write is not seen.

For tests, `LOFIT_TEST_KILL_AT=POINT[@GLOB]` SIGKILLs the process at a named point of a write whose target
name matches GLOB (see `KILL_POINTS`), and `LOFIT_TEST_NO_EXCHANGE=1` forces the two-rename fallback.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for text in ("old", "new"):
    ...     with atomic_directory(root / "adapter") as tmp:
    ...         _ = (tmp / "config.json").write_text(text)
    >>> (root / "adapter" / "config.json").read_text(), sorted(p.name for p in root.iterdir())
    ('new', ['adapter'])
    >>> (root / "link").symlink_to(root / "adapter")
    >>> atomic_write_text(root / "link", "x")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lofit.io.atomic.LinkedOutputError: ... is a symbolic link (to ...adapter); lofit never writes through a link, since that would replace what it points to. Remove the link or choose another output path
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import errno
import fnmatch
import json
import os
import re
import secrets
import shutil
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LofitError, LofitValueError

try:
    import fcntl
except ImportError:  # Windows: no flock; writes stay atomic, concurrent writers are not excluded
    fcntl = None  # type: ignore[assignment]

KILL_POINTS = {
    "file-written": "a temporary file is complete and fsynced, not yet renamed over the target",
    "file-replaced": "right after the rename of a file over the target",
    "dir-built": "a temporary folder is complete and fsynced, the target untouched",
    "dir-backed-up": "two-rename fallback: right after target -> backup, before temporary -> target",
    "dir-swapped": "right after the rename (or exchange) that put the new folder in place, old not yet deleted",
}
# What a folder of model files holds as content: never carried over from an old "model"/"own" folder into
# the new one (a stale shard beside a new checkpoint would corrupt it).
CONTENT_PATTERNS = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.msgpack", "*.h5", "*.index.json",
    "config.json", "generation_config.json", "lofit_config.json", "red_config.json", "adapter_config.json",
    "state.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "chat_template.*", "*.model", "preprocessor_config.json", "processor_config.json", ".lofit*",
)  # fmt: skip
POLICIES = ("own", "beside", "model")
MANIFEST_NAME = ".lofit-manifest.json"  # in a "model" folder: the files lofit wrote there
MANIFEST_FORMAT = "lofit-manifest"
# `.NAME.lofit-KIND-PID-XXXXXXXX`: KIND is tmp (a temporary being built), old (a fallback swap's backup) or
# removing (a checkpoint being deleted); XXXXXXXX are 8 random hex characters. Group 1 is NAME.
_LEFTOVER = re.compile(r"^\.(.+)\.lofit-(tmp|old|removing)-\d+-[a-z0-9_]{8}$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO})
# How libraries written in Rust/C++ report an OS error in their own exception's text.
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)|\[Errno (\d+)\]")


class LinkedOutputError(LofitValueError):
    """An output path (or a folder between the output root and it) is a symbolic link."""


class InputOverwriteError(LofitValueError):
    """A write would replace, or land inside, one of the operation's inputs."""


class ForeignContentError(LofitValueError):
    """A folder to replace holds model files lofit did not write; replacing needs an explicit overwrite."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def kill_point(point: str, target: Path) -> None:
    """SIGKILL this process if `LOFIT_TEST_KILL_AT` names `point` (and a glob matching `target`'s name)."""
    spec = os.environ.get("LOFIT_TEST_KILL_AT")
    if not spec:
        return
    wanted, _, pattern = spec.partition("@")
    if wanted == point and fnmatch.fnmatchcase(target.name, pattern or "*"):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def write_errno(error: BaseException) -> int | None:
    """The errno of a failed write (disk full, quota, read-only, too large) in `error`, else None.

    Also reads it from the text of libraries that report OS errors in their own type (safetensors:
    `SafetensorError: ... No space left on device (os error 28)`).

    Example:
        >>> write_errno(OSError(28, "No space left on device")), write_errno(ValueError("bad value"))
        (28, None)
        >>> write_errno(RuntimeError("I/O error: No space left on device (os error 28)"))
        28
    """
    if isinstance(error, OSError):
        return error.errno if error.errno in WRITE_ERRNOS else None
    match = _ERRNO_IN_TEXT.search(str(error))
    if match:
        code = int(next(group for group in match.groups() if group))
        return code if code in WRITE_ERRNOS else None
    return None


@contextlib.contextmanager
def naming_os_errors(target: Path) -> Iterator[None]:
    """Turn a failed write into an `OSError` that names the output path being written.

    An OSError without a file name (ENOSPC from a write, say) gets `target`'s; an exception of another type
    that reports a write error (safetensors, tokenizers), or any error while `target`'s disk is full, becomes
    an OSError, so the command line exits 2 with a message, not 1 with "internal error".
    """
    try:
        yield
    except LofitError:
        raise
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise type(error)(error.errno, f"cannot write {target}: {error.strerror or error}") from error
        raise
    except Exception as error:
        code = write_errno(error)
        if code is None and _disk_full(target):
            code = errno.ENOSPC
        if code is None:
            raise
        raise OSError(code, f"cannot write {target}: {os.strerror(code)}") from error


def _disk_full(target: Path) -> bool:
    for folder in (target.parent, *target.parent.parents):
        if folder.exists():
            try:
                return os.statvfs(folder).f_bavail == 0
            except (OSError, AttributeError):
                return False
    return False


# -------------------------------------------------------------------------------- write guard
@dataclass(frozen=True)
class _Guard:
    root: Path | None  # the output root as given (unresolved); None: no root
    inputs: tuple[tuple[str, Path], ...]  # (option, resolved path)
    option: str


_guards: contextvars.ContextVar[tuple[_Guard, ...]] = contextvars.ContextVar("lofit_write_guards", default=())


def _real(path: str | os.PathLike[str]) -> Path:
    try:
        return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))
    except (OSError, RuntimeError):  # a symlink loop
        return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


@contextlib.contextmanager
def write_guard(
    inputs: Mapping[str, str | os.PathLike[str] | None],
    root: str | os.PathLike[str] | None = None,
    option: str = "--out",
) -> Iterator[None]:
    """Check every write made inside the block against the operation's inputs and its output root.

    Each file or folder written (through this module) must not be, contain or lie inside an input, links
    resolved (`InputOverwriteError`); below `root`, no folder on the way to it may be a symbolic link
    (`LinkedOutputError`). Nested guards add up: a write must pass all of them.

    Args:
        inputs: option name -> input path (None entries skipped), e.g. `{"--model": "m/", "--train": "t.jsonl"}`.
        root: the output root (a run's `--out`), or None.
        option: the output's option name, for messages.

    Example:
        >>> import tempfile, pathlib
        >>> data = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (data / "train.jsonl").write_text("{}")
        >>> with write_guard({"--train": data / "train.jsonl"}):
        ...     atomic_write_text(data / "train.jsonl", "x")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lofit.io.atomic.InputOverwriteError: ...train.jsonl is the input --train ...; lofit never writes where it reads. Choose an --out outside every input
    """
    guard = _Guard(
        root=Path(os.path.abspath(os.path.expanduser(os.fspath(root)))) if root is not None else None,
        inputs=tuple((name, _real(path)) for name, path in inputs.items() if path is not None),
        option=option,
    )
    token = _guards.set((*_guards.get(), guard))
    try:
        yield
    finally:
        _guards.reset(token)


def _check_guards(raw: Path, target: Path) -> None:
    for guard in _guards.get():
        _check_guard(guard, raw, target)


def _check_guard(guard: _Guard, raw: Path, target: Path) -> None:
    for name, source in guard.inputs:
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents:
            relation = "lies inside"
        else:
            continue
        raise InputOverwriteError(
            f"{raw} {relation} the input {name} {source}; lofit never writes where it reads. "
            f"Choose an {guard.option} outside every input"
        )
    if guard.root is not None and guard.root in raw.parents:
        folder = raw.parent
        while folder != guard.root:
            if folder.is_symlink():
                raise LinkedOutputError(
                    f"{folder} (inside {guard.option} {guard.root}) is a symbolic link (to "
                    f"{os.readlink(folder)}); lofit never writes through a link, since that would write into "
                    "what it points to. Remove the link or choose another output path"
                )
            folder = folder.parent


def output_target(path: str | os.PathLike[str]) -> Path:
    """The location a write of `path` replaces: its folder with links resolved, its own name never followed.

    Args:
        path: the output file or folder.

    Returns:
        The absolute path, whose parent is link-free.

    Raises:
        LinkedOutputError: `path` itself is a symbolic link (writing would replace its destination), or a
            folder between the active `write_guard`'s root and `path` is one.
        InputOverwriteError: `path` is, contains or lies inside an input of the active `write_guard`.
    """
    raw = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if raw.is_symlink():
        raise LinkedOutputError(
            f"{raw} is a symbolic link (to {os.readlink(raw)}); lofit never writes through a link, since that "
            "would replace what it points to. Remove the link or choose another output path"
        )
    target = _real(raw.parent) / raw.name
    _check_guards(raw, target)
    return target


# ------------------------------------------------------------------------------------- locks
@contextlib.contextmanager
def _flocked(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on the file or folder `path`; yields False if `blocking=False` and it is taken."""
    if fcntl is None:
        yield True
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _hold_flock(path: Path) -> int | None:
    """Flock `path` for as long as the returned descriptor stays open (marks a temporary as in use)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _in_use(path: Path) -> bool:
    try:
        with _flocked(path, blocking=False) as free:
            return not free
    except OSError:  # vanished meanwhile, or unreadable: not ours to judge, leave it
        return True


# ---------------------------------------------------------------------------------- recovery
def is_leftover(name: str) -> bool:
    """Whether `name` is one lofit gives its temporaries, backups and removals (`.NAME.lofit-tmp-PID-XXXXXXXX`).

    Example:
        >>> is_leftover(".adapter.lofit-tmp-123-abcd_123"), is_leftover(".notes.20240101.tmp")
        (True, False)
    """
    return _LEFTOVER.match(name) is not None


def leftover_name(target: Path, kind: str) -> Path:
    """A fresh name beside `target` for a leftover of `kind` ("tmp", "old" or "removing")."""
    return target.with_name(f".{target.name}.lofit-{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _leftovers(parent: Path, name: str) -> list[tuple[Path, str]]:
    """(path, kind) of the leftovers of writes of `parent/name`; kind is 'tmp', 'old' or 'removing'."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    found = []
    for entry in entries:
        match = _LEFTOVER.match(entry)
        if match and match.group(1) == name:
            found.append((parent / entry, match.group(2)))
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover(path: str | os.PathLike[str]) -> None:
    """Undo a folder swap that a killed process left half done, and delete its leftovers.

    If `path` is missing but a complete backup of it (`.NAME.lofit-old-*`) exists, the backup is renamed
    back; temporaries of dead processes and stale backups are deleted. Safe to call at any time, by any process.

    Args:
        path: a file or folder lofit writes (an adapter, a merged checkpoint, `heads.json`, ...).
    """
    target = _real(path)
    if not _leftovers(target.parent, target.name):
        return
    with _flocked(target.parent):
        backups = [p for p, kind in _leftovers(target.parent, target.name) if kind == "old"]
        if backups and not os.path.lexists(target):
            newest = max(backups, key=lambda p: p.stat().st_mtime_ns)
            os.rename(newest, target)
        for leftover, kind in _leftovers(target.parent, target.name):
            if kind != "tmp" or not _in_use(leftover):
                _remove(leftover)


def remove_leftovers(folder: str | os.PathLike[str], depth: int = 3) -> None:
    """Run `recover` for every leftover of a crashed write in `folder` and its subfolders (`depth` levels).

    Only names with lofit's marker (`is_leftover`) are touched.

    Args:
        folder: an output folder (e.g. a run's `--out`).
        depth: how many levels of subfolders to visit (symlinks are not followed).
    """
    root = _real(folder)
    if not root.is_dir():
        return
    names = set()
    for entry in os.scandir(root):
        match = _LEFTOVER.match(entry.name)
        if match:
            names.add(match.group(1))
    for name in sorted(names):
        recover(root / name)
    if depth > 0:
        for entry in os.scandir(root):
            if entry.is_dir(follow_symlinks=False) and not _LEFTOVER.match(entry.name):
                remove_leftovers(entry.path, depth - 1)


def remove_folder(path: str | os.PathLike[str]) -> None:
    """Delete a folder lofit wrote (a checkpoint) so that an interrupted removal leaves no half folder.

    It is renamed to a leftover name first (`.NAME.lofit-removing-...`), which `remove_leftovers` finishes.
    """
    target = output_target(path)
    doomed = leftover_name(target, "removing")
    os.rename(target, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# -------------------------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure delete it.

    Args:
        path: the file to (re)write. Leftovers of earlier crashed writes of it are deleted first.

    Returns:
        A context manager yielding the temporary `Path` to write.

    Raises:
        LinkedOutputError: `path` is a symbolic link (see `output_target`).
        LofitValueError: `path` is a folder.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "metrics.json"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("{}")
        >>> target.read_text()
        '{}'
    """
    target = output_target(path)
    if target.is_dir():
        raise LofitValueError(f"{path} is a folder; give the path of a file to write instead")
    with naming_os_errors(target):
        yield from _atomic_path(target)


def _atomic_path(target: Path) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = leftover_name(target, "tmp")
    os.close(
        os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    )  # the umask applies: usual permissions
    marker = _hold_flock(tmp)
    try:
        yield tmp
        _fsync_file(tmp)
        kill_point("file-written", target)
        os.replace(tmp, target)
        kill_point("file-replaced", target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        if marker is not None:
            os.close(marker)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can open or fsync a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (never through a link: see `output_target`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write `data` as indented JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_write_with(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and move the result to `path` only if it succeeded."""
    with atomic_path(path) as tmp:
        write(tmp)


# ------------------------------------------------------------------------------------ folders
def _is_content(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in CONTENT_PATTERNS)


def _manifest(folder: Path) -> set[str]:
    """The names a "model" folder's manifest says lofit wrote (empty without a valid manifest)."""
    try:
        document = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return set()
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        return set()
    files = document.get("files")
    if not isinstance(files, list):
        return set()
    return {name for name in files if isinstance(name, str)}


def foreign_content(path: str | os.PathLike[str]) -> list[str]:
    """The model files (`CONTENT_PATTERNS`) in folder `path` that lofit did not write (per its manifest).

    Args:
        path: a folder, e.g. the `--out` of `lofit merge`; a missing folder has none.

    Returns:
        Their names, sorted (empty if `path` is missing, empty, or only holds lofit's files and other files).
    """
    folder = Path(path)
    if not folder.is_dir():
        return []
    owned = _manifest(folder) | {MANIFEST_NAME}
    return sorted(
        entry.name
        for entry in os.scandir(folder)
        if not _LEFTOVER.match(entry.name) and entry.name not in owned and _is_content(entry.name)
    )


def check_replaceable(path: str | os.PathLike[str], overwrite: bool, option: str = "overwrite=True") -> None:
    """Refuse to replace a folder holding model files lofit did not write, unless `overwrite`.

    Args:
        path: the folder to be replaced by a "model" write.
        overwrite: the caller's explicit consent.
        option: how the caller spells that consent, for the message (`--overwrite`).

    Raises:
        ForeignContentError: naming the files and the option.
        LinkedOutputError: `path` is a symbolic link.
    """
    target = output_target(path)
    foreign = foreign_content(target)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ForeignContentError(
            f"{path} holds files lofit did not write ({shown}): another model, which this would replace. "
            f"Choose an empty or new folder, or pass {option} to replace it (files that are no model "
            "content, such as notes, are kept)"
        )


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike[str],
    replace_existing: bool = True,
    *,
    policy: str = "own",
    overwrite: bool = False,
    overwrite_option: str = "overwrite=True",
) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to fill; swap it in whole only if the block succeeds.

    Args:
        path: the folder to create or replace. A kill at any moment leaves its complete old or complete new
            content (see the module docstring for how, and the limits). Never a symbolic link.
        replace_existing: if False and `path` exists when the block ends (another process built it first),
            the existing folder is kept and the new one discarded.
        policy: what happens to the old folder's entries the new content lacks: "own" (model content
            replaced, other files kept), "beside" (all kept: an adapter saved next to a model keeps the
            model) or "model" (lofit's files replaced; model files lofit did not write refused unless
            `overwrite`; other files kept). "model" writes the manifest `.lofit-manifest.json`.
        overwrite: with policy "model", replace model files lofit did not write.
        overwrite_option: how the caller spells `overwrite`, for the message (e.g. "--overwrite").

    Returns:
        A context manager yielding the temporary folder's `Path`. On failure it is deleted.

    Raises:
        NotADirectoryError: `path` exists and is not a folder.
        LinkedOutputError, InputOverwriteError: see `output_target`.
        ForeignContentError: policy "model", foreign model files in `path` and not `overwrite`.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r}: choose one of {', '.join(POLICIES)}")
    target = output_target(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory; choose another output path")
    if policy == "model":
        check_replaceable(target, overwrite, overwrite_option)
    with naming_os_errors(target):
        yield from _atomic_directory(target, replace_existing, policy, overwrite, overwrite_option)


def _atomic_directory(
    target: Path, replace_existing: bool, policy: str, overwrite: bool, overwrite_option: str
) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = leftover_name(target, "tmp")
    os.mkdir(tmp)  # the umask applies: usual permissions
    marker = _hold_flock(tmp)
    try:
        yield tmp
        if policy == "model":
            names = sorted(entry.name for entry in os.scandir(tmp))
            (tmp / MANIFEST_NAME).write_text(
                json.dumps({"format": MANIFEST_FORMAT, "files": names}, indent=1) + "\n", encoding="utf-8"
            )
        _fsync_tree(tmp)
        kill_point("dir-built", target)
        old = _swap_in(tmp, target, replace_existing, policy, overwrite, overwrite_option)
        _fsync_dir(target.parent)
        if old is not None:
            kill_point("dir-swapped", target)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if marker is not None:
            os.close(marker)


def _fsync_tree(root: Path) -> None:
    mode = 0o666 & ~_umask()
    for folder, _, files in os.walk(root):
        for name in files:
            file = Path(folder, name)
            os.chmod(file, mode)  # some writers (safetensors) create owner-only files
            _fsync_file(file)
        _fsync_dir(Path(folder))


def _swap_in(
    tmp: Path, target: Path, replace_existing: bool, policy: str, overwrite: bool, overwrite_option: str
) -> Path | None:
    """Put `tmp` at `target`; return where the old content (to delete) now is, if any."""
    with _flocked(target.parent):
        if os.path.islink(target):  # a link put there while the new content was built
            output_target(target)
        try:
            os.rename(tmp, target)  # fails if target exists (and is not an empty folder)
            kill_point("dir-swapped", target)
            return None
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.is_dir():
                raise
        if not replace_existing:
            return tmp
        if policy == "model":  # again, under the lock: another program may have filled it meanwhile
            check_replaceable(target, overwrite, overwrite_option)
        _carry_over(target, tmp, policy)
        if _exchange(tmp, target):
            return tmp  # tmp now holds the old content
        backup = tmp.with_name(tmp.name.replace(".lofit-tmp-", ".lofit-old-", 1))
        os.rename(target, backup)
        kill_point("dir-backed-up", target)
        os.rename(tmp, target)
        return backup


def _carry_over(old: Path, new: Path, policy: str) -> None:
    """Link into `new` the entries of `old` that the new content lacks and that lofit does not replace."""
    owned = _manifest(old) | {MANIFEST_NAME} if policy == "model" else set()
    for entry in os.scandir(old):
        name = entry.name
        if _LEFTOVER.match(name) or name in owned or os.path.lexists(new / name):
            continue
        if policy != "beside" and _is_content(name):
            continue  # "own": replaced; "model": lofit's, or another model's with overwrite=True
        destination = new / name
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, destination, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), destination)
        else:
            _link_or_copy(entry.path, os.fspath(destination))


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # a filesystem without hard links
        shutil.copy2(source, destination)


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):  # no glibc >= 2.28 (e.g. musl): use the fallback
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap the entries `a` and `b` in one atomic step; False where the system or filesystem cannot."""
    if _renameat2 is None or os.environ.get("LOFIT_TEST_NO_EXCHANGE"):
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))
