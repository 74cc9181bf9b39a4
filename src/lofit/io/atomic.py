"""Write files and folders so that a kill at any moment leaves the complete old or the complete new content.

Files (`atomic_path`, `atomic_write_text`, `atomic_write_json`, `atomic_write_with`) are written to a hidden
temporary file beside the target (`.NAME.XXXXXXXX.tmp`), fsynced and renamed over it: rename(2) is atomic,
so readers see the old file or the new one.

Folders (`atomic_directory`: adapters, merged checkpoints, training checkpoints, the bundled-model cache)
are built completely in a hidden temporary folder beside the target, fsynced, and swapped in whole, so no
file of the old content survives beside the new (a merge over a sharded checkpoint leaves no old shard).
Files of the old folder that are no model or adapter content (`CONTENT_PATTERNS`: weights, configs,
tokenizer files, ...) and that the new content lacks, a user's `notes.txt` say, are carried over into the
new folder by hard links (copies where links fail) before the swap, so replacing an output never loses
them. The swap itself:

- target absent: one rename(2);
- target present, Linux: renameat2(RENAME_EXCHANGE) swaps the two folders in one atomic step; the old
  content, now under the temporary name, is deleted afterwards;
- target present elsewhere (or on a filesystem without RENAME_EXCHANGE): target -> `.NAME.XXXXXXXX.lofit-old`,
  then temporary -> target, then the backup is deleted. A kill between the two renames leaves no target
  but a complete backup: `recover(target)` renames the backup back. Every lofit writer runs it before
  writing `target`, and lofit's readers (adapter, checkpoint) run it when `target` is missing.

A run's output folder (`lofit run/select/train --out`) is not replaced whole, since it keeps the
checkpoints a `--resume` continues from: each artefact in it is (`adapter/`, `heads.json`, `heads.png`,
`metrics.json`, `report.md`, each checkpoint), while the command holds the lock on it (`lofit.io.locking`).

Swaps and recoveries of one folder hold an exclusive flock(2) on its parent folder, so two writers (or a
writer and a recovery) never interleave their renames. A temporary file or folder is flocked by the process
building it, so the cleanup of a crashed write (`remove_leftovers`, run on the next write of that target
and when a command takes the lock on its output folder) deletes only the leftovers of dead processes:
`.NAME.XXXXXXXX.tmp` (8 random characters, as `tempfile` makes them: also those of older lofit versions),
stale `.NAME.XXXXXXXX.lofit-old` backups and `.step-N.removing` folders of interrupted checkpoint removals.
Nothing else is touched, so a user's own dotfiles in an output folder are safe.

Limits: the guarantee is about kills (SIGKILL, OOM, a crash) and errors (a full disk): a power loss is
covered as far as the filesystem honours fsync of files and folders. In the two-rename fallback the target
is absent for the moment between the renames: a program other than lofit (plain `from_pretrained`) that
reads it then finds nothing until the next lofit command restores it. Locks are advisory and local: on
network filesystems without working flock(2) concurrent writers are not excluded. A folder given through a
symlink is swapped at the symlink's destination, so the link keeps pointing to the (new) content.

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
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fnmatch
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
# What a folder lofit replaces may hold as content: never carried over from the old folder into the new.
CONTENT_PATTERNS = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.msgpack", "*.h5", "*.index.json",
    "config.json", "generation_config.json", "lofit_config.json", "red_config.json", "adapter_config.json",
    "state.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "chat_template.*", "*.model", "preprocessor_config.json", "processor_config.json", ".lofit*",
)  # fmt: skip
# `.NAME.XXXXXXXX.tmp` (temporaries: mkstemp/mkdtemp's 8 random characters), `.NAME.XXXXXXXX.lofit-old`
# (fallback backups), `.step-N.removing` (checkpoint removals): group 1 or 3 is NAME, the target's name.
_LEFTOVER = re.compile(r"^\.(.+)\.[a-z0-9_]{8}\.(tmp|lofit-old)$|^\.(step-\d+)\.(removing)$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


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


@contextlib.contextmanager
def naming_os_errors(target: Path) -> Iterator[None]:
    """Give an OSError that names no file (ENOSPC from a write, say) the output path being written."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise type(error)(error.errno, f"cannot write {target}: {error.strerror or error}") from error
        raise


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
def _resolved(path: str | os.PathLike[str]) -> Path:
    """The real location written: a symlinked target is replaced at its destination."""
    return Path(os.path.realpath(os.fspath(path)))


def _leftovers(parent: Path, name: str) -> list[tuple[Path, str]]:
    """(path, kind) of the leftovers of writes of `parent/name`; kind is 'tmp', 'lofit-old' or 'removing'."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    found = []
    for entry in entries:
        match = _LEFTOVER.match(entry)
        if match and (match.group(1) or match.group(3)) == name:
            found.append((parent / entry, match.group(2) or match.group(4)))
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover(path: str | os.PathLike[str]) -> None:
    """Undo a folder swap that a killed process left half done, and delete its leftovers.

    If `path` is missing but a complete backup of it (`.NAME.*.lofit-old`) exists, the backup is renamed back;
    temporaries of dead processes and stale backups are deleted. Safe to call at any time, by any process.

    Args:
        path: a file or folder lofit writes (an adapter, a merged checkpoint, `heads.json`, ...).
    """
    target = _resolved(path)
    if not _leftovers(target.parent, target.name):
        return
    with _flocked(target.parent):
        backups = [p for p, kind in _leftovers(target.parent, target.name) if kind == "lofit-old"]
        if backups and not os.path.lexists(target):
            newest = max(backups, key=lambda p: p.stat().st_mtime_ns)
            os.rename(newest, target)
        for leftover, kind in _leftovers(target.parent, target.name):
            if kind != "tmp" or not _in_use(leftover):
                _remove(leftover)


def remove_leftovers(folder: str | os.PathLike[str], depth: int = 3) -> None:
    """Run `recover` for every leftover of a crashed write in `folder` and its subfolders (`depth` levels).

    Args:
        folder: an output folder (e.g. a run's `--out`).
        depth: how many levels of subfolders to visit (symlinks are not followed).
    """
    root = _resolved(folder)
    if not root.is_dir():
        return
    names = set()
    for entry in os.scandir(root):
        match = _LEFTOVER.match(entry.name)
        if match:
            names.add(match.group(1) or match.group(3))
    for name in sorted(names):
        recover(root / name)
    if depth > 0:
        for entry in os.scandir(root):
            if entry.is_dir(follow_symlinks=False) and not _LEFTOVER.match(entry.name):
                remove_leftovers(entry.path, depth - 1)


# -------------------------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure delete it.

    Args:
        path: the file to (re)write. Leftovers of earlier crashed writes of it are deleted first.

    Returns:
        A context manager yielding the temporary `Path` to write.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "metrics.json"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("{}")
        >>> target.read_text()
        '{}'
    """
    target = _resolved(path)
    if target.is_dir():
        from ..errors import LofitValueError

        raise LofitValueError(f"{path} is a folder; give the path of a file to write instead")
    with naming_os_errors(target):
        yield from _atomic_path(target)


def _atomic_path(target: Path) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    marker = _hold_flock(tmp)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; give the usual permissions
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
    """Write `text` (UTF-8) to `path` atomically."""
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
@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], replace_existing: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to fill; swap it in whole only if the block succeeds.

    Args:
        path: the folder to create or replace. A kill at any moment leaves its complete old or complete new
            content (see the module docstring for how, and the limits); nothing of the old content is kept.
        replace_existing: if False and `path` exists when the block ends (another process built it first),
            the existing folder is kept and the new one discarded.

    Returns:
        A context manager yielding the temporary folder's `Path`. On failure it is deleted.

    Raises:
        NotADirectoryError: `path` exists and is not a folder.
    """
    target = _resolved(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory; choose another output path")
    with naming_os_errors(target):
        yield from _atomic_directory(target, replace_existing)


def _atomic_directory(target: Path, replace_existing: bool) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    marker = _hold_flock(tmp)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only
        yield tmp
        _fsync_tree(tmp)
        kill_point("dir-built", target)
        old = _swap_in(tmp, target, replace_existing)
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


def _swap_in(tmp: Path, target: Path, replace_existing: bool) -> Path | None:
    """Put `tmp` at `target`; return where the old content (to delete) now is, if any."""
    with _flocked(target.parent):
        try:
            os.rename(tmp, target)  # fails if target exists (and is not an empty folder)
            kill_point("dir-swapped", target)
            return None
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.is_dir():
                raise
        if not replace_existing:
            return tmp
        _carry_over(target, tmp)
        if _exchange(tmp, target):
            return tmp  # tmp now holds the old content
        backup = tmp.with_suffix(".lofit-old")  # as unique as the temporary's random name
        os.rename(target, backup)
        kill_point("dir-backed-up", target)
        os.rename(tmp, target)
        return backup


def _carry_over(old: Path, new: Path) -> None:
    """Link into `new` the entries of `old` that are no content (see CONTENT_PATTERNS) and `new` lacks."""
    for entry in os.scandir(old):
        name = entry.name
        if _LEFTOVER.match(name) or any(fnmatch.fnmatchcase(name, p) for p in CONTENT_PATTERNS):
            continue
        destination = new / name
        if os.path.lexists(destination):
            continue  # the new content has its own
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
