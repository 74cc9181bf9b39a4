"""Commit a finished result at once, so that a long run can be stopped anywhere and resumed from git."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def commit_path(path: Path, message: str, attempts: int = 5) -> bool:
    """`git add` + `git commit` of `path` (a file or folder) in the repository that holds it.

    Retried (another process may hold the index lock); a failure is printed and left for the next commit,
    never fatal to the run. Returns whether the commit went in (or there was nothing to commit).
    """
    path = path.resolve()  # git -C runs from the file's folder: a relative path would not match there
    repo = path if path.is_dir() else path.parent
    add = done = subprocess.CompletedProcess[str]([], 0, "", "")
    for attempt in range(attempts):
        add = subprocess.run(["git", "-C", str(repo), "add", str(path)], capture_output=True, text=True)
        done = subprocess.run(
            ["git", "-C", str(repo), "commit", "-q", "-m", message, "--", str(path)],
            capture_output=True,
            text=True,
        )
        if add.returncode == 0 and (done.returncode == 0 or "nothing" in done.stdout + done.stderr):
            return True
        time.sleep(2 + 3 * attempt)
    print(f"[benchmarks] could not commit {path}: {done.stderr.strip() or add.stderr.strip()}", flush=True)
    return False
