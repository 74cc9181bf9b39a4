"""Write files so that a crash or a full disk never leaves a partial file at the final path."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def naming_os_errors(target: Path) -> Iterator[None]:
    """Give an OSError that names no file (ENOSPC from a write, say) the output path being written."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise type(error)(error.errno, f"cannot write {target}: {error.strerror or error}") from error
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure delete it."""
    target = Path(path)
    with naming_os_errors(target):
        yield from _atomic_path(target)


def _atomic_path(target: Path) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; give the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_write_with(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` and move the result to `path` only if it succeeded."""
    with atomic_path(path) as tmp:
        write(tmp)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], replace_existing: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path` to fill; publish it only if the block succeeds.

    A new `path` appears in one rename. If `path` exists already, its files are replaced one by one
    (each atomically), or, with `replace_existing=False`, the existing directory is kept and the new
    one discarded (another process built it first). On failure the temporary directory is deleted.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; choose another output path")
    with naming_os_errors(target):
        yield from _atomic_directory(target, replace_existing)


def _atomic_directory(target: Path, replace_existing: bool) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only
        yield tmp
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        mode = 0o666 & ~_umask()
        for file in files:
            os.chmod(file, mode)  # some writers (safetensors) create owner-only files
            with open(file, "rb+") as handle:
                os.fsync(handle.fileno())
        try:
            os.rename(tmp, target)  # fails if target exists (and is not an empty directory)
            return
        except OSError:
            if not target.is_dir():
                raise
        if replace_existing:
            for file in files:
                destination = target / file.relative_to(tmp)
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(file, destination)
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
