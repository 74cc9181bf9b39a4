"""The lock on an output: a second writer is refused naming the holder, a dead holder's lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lofit.io.locking import OutputLockedError, holder, lock_path, output_lock

# Holds an flock on the lock file and records itself there, as a running lofit command does; pure Python,
# so it starts in milliseconds.
HOLDER = """
import fcntl, json, os, socket, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": "lofit train --out x",
                         "since": "2026-01-01T00:00:00+00:00"}).encode())
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def held(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_path(out))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline() == "held\n"
    yield out, process.pid
    process.communicate("")


def test_a_second_writer_is_refused_naming_the_holder(held: tuple[Path, int]) -> None:
    out, pid = held
    with pytest.raises(OutputLockedError) as error, output_lock(out):
        pass
    message = str(error.value)
    assert f"{out} is being written by process {pid} on {socket.gethostname()}" in message
    assert "`lofit train --out x`" in message and "choose another output path" in message
    assert holder(out) == {
        "pid": pid, "host": socket.gethostname(), "command": "lofit train --out x", "since": "2026-01-01T00:00:00+00:00"
    }  # fmt: skip
    assert lock_path(out).exists()  # the holder's lock is left alone


def test_the_command_line_exits_2_when_the_output_is_locked(
    held: tuple[Path, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lofit.cli.main import main

    out, pid = held
    code = main(
        ["merge", "--model", str(tmp_path / "no-model"), "--adapter", str(tmp_path / "a"), "--out", str(out)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("lofit merge: error: ") and f"process {pid}" in err and "Traceback" not in err
    assert not out.exists()


def test_a_dead_holders_lock_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    info = {
        "pid": int(dead.stdout),
        "host": socket.gethostname(),
        "command": "lofit run --out run",
        "since": "x",
    }
    lock_path(out).write_text(json.dumps(info))  # what a SIGKILLed command leaves: the file, no flock
    assert holder(out) is None
    with caplog.at_level(logging.WARNING, logger="lofit.io.locking"), output_lock(out):
        assert holder(out)["pid"] == os.getpid()  # type: ignore[index]
    assert f"took over the lock left by process {info['pid']}" in caplog.text
    assert not lock_path(out).exists()


def test_the_lock_is_reentrant_and_released(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with output_lock(out) as lock:
        assert lock == tmp_path / ".merged.lofit-lock"
        with output_lock(out):
            pass
        assert lock.exists() and holder(out) is not None  # still held by the outer block
        child = subprocess.run(
            [sys.executable, "-c", "import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDWR); "
             "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(lock)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert child.returncode != 0 and "BlockingIOError" in child.stderr  # another process cannot take it
    assert not lock.exists() and holder(out) is None


def test_taking_the_lock_cleans_up_crashed_writes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "train" / "checkpoints" / ".step-00000002.lofit-removing-4242-0a1b2c3d").mkdir(parents=True)
    (out / ".heads.json.lofit-tmp-4242-abcd1234").write_text("partial")
    (
        tmp_path / ".run.lofit-old-4242-abcd1234"
    ).mkdir()  # a complete backup of `run` beside it: stale, run exists
    (out / "heads.json").write_text("{}")
    with output_lock(out):
        pass
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "run", "run/heads.json", "run/train", "run/train/checkpoints"
    ]  # fmt: skip


def test_an_unwritable_place_for_the_lock_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with (
        pytest.raises(OSError, match=r"cannot write to the output directory .*file .*to lock .*file/out"),
        output_lock(tmp_path / "file" / "out"),
    ):
        pass
