"""Find the benchmark data folder (the one holding truthfulqa/, mquake/, clutrr/, ...).

Order: the explicit argument (--data-dir) > $LOFIT_DATA_DIR > the nearest `shared/data` walking up from
the current directory, then from this package's location (a checkout with `../shared/data` beside it) >
the download cache ($LOFIT_CACHE_DIR/data, default ~/.cache/lofit/data, filled by `lofit data download`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError

ENV_DATA_DIR = "LOFIT_DATA_DIR"
ENV_CACHE_DIR = "LOFIT_CACHE_DIR"


def cache_dir() -> Path:
    """lofit's cache root: $LOFIT_CACHE_DIR, else ~/.cache/lofit."""
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lofit"


def cache_data_dir() -> Path:
    """Where `lofit data download` puts benchmark folders."""
    return cache_dir() / "data"


def _ancestors(start: Path) -> Iterator[Path]:
    start = start.resolve()
    yield start
    yield from start.parents


def shared_data_candidates(cwd: Path | None = None) -> list[Path]:
    """Every existing `<ancestor>/shared/data`, nearest first, from the cwd and then from the package."""
    seen: list[Path] = []
    for origin in (cwd or Path.cwd(), Path(__file__).parent):
        for folder in _ancestors(origin):
            candidate = folder / "shared" / "data"
            if candidate.is_dir() and candidate not in seen:
                seen.append(candidate)
    return seen


def _has(root: Path, benchmark: str | None) -> bool:
    return root.is_dir() and (benchmark is None or (root / benchmark).is_dir())


def _explicit(root: Path, benchmark: str | None, origin: str) -> Path:
    if not root.is_dir():
        raise DataError(root, None, None, f"the data directory ({origin}) does not exist", _fix(benchmark))
    if benchmark is None or (root / benchmark).is_dir():
        return root
    if root.name == benchmark:  # pointed at the benchmark folder itself
        return root.parent
    raise DataError(
        root,
        None,
        None,
        f"the data directory ({origin}) has no '{benchmark}' folder",
        f"point it at the folder that holds {benchmark}/ (like ../shared/data), or run "
        f"`lofit data download {benchmark}`",
    )


def resolve_data_dir(data_dir: str | Path | None = None, benchmark: str | None = None) -> Path:
    """The data root to use: `data_dir`, `$LOFIT_DATA_DIR`, the nearest `shared/data`, or the cache.

    Args:
        data_dir: an explicit root (wins; must exist).
        benchmark: with a name, only a root holding `<root>/<benchmark>/` qualifies.

    Returns:
        The data root.

    Raises:
        DataError: no root found (the message lists where it looked and how to get the data).
    """
    if data_dir is not None:
        return _explicit(Path(data_dir).expanduser(), benchmark, "--data-dir")
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return _explicit(Path(env).expanduser(), benchmark, f"${ENV_DATA_DIR}")
    for candidate in shared_data_candidates():
        if _has(candidate, benchmark):
            return candidate
    cached = cache_data_dir()
    if _has(cached, benchmark):
        return cached
    what = f"the '{benchmark}' data" if benchmark else "a benchmark data directory"
    raise DataError(None, None, None, f"could not find {what}", _fix(benchmark))


def benchmark_dir(benchmark: str, data_dir: str | Path | None = None) -> Path:
    """`<data root>/<benchmark>`, following `resolve_data_dir`'s search order.

    Args:
        benchmark: the benchmark folder name ("truthfulqa", "mquake", ...).
        data_dir: an explicit data root.

    Returns:
        The benchmark's folder.
    """
    return resolve_data_dir(data_dir, benchmark) / benchmark


def find_split_file(folder: Path, stem: str) -> Path:
    """`folder/stem.jsonl` (as in ../shared/data) or `folder/stem.json` (as downloaded).

    Args:
        folder: a benchmark folder.
        stem: the split's file name without suffix.

    Returns:
        The existing file; DataError if neither exists.
    """
    for suffix in (".jsonl", ".json"):
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise DataError(
        folder / f"{stem}.jsonl",
        None,
        None,
        "file not found (nor a .json version)",
        "point --data-dir at a complete data folder or run `lofit data download`",
    )


def _fix(benchmark: str | None) -> str:
    name = f" {benchmark}" if benchmark else ""
    return (
        f"pass --data-dir DIR (data_dir=...) with the folder holding the benchmark folders, set "
        f"{ENV_DATA_DIR}=DIR, or run `lofit data download{name}` to fetch it into {cache_data_dir()}"
    )
