"""Whole-folder atomic replacement, recovery of half-done swaps, leftover cleanup (in-process parts).

Kills of real processes at each point are in test_kills.py.
"""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lofit.io.locking
from lofit.errors import LofitValueError
from lofit.io import atomic
from lofit.io.atomic import atomic_directory, atomic_path, atomic_write_text, recover, remove_leftovers


@pytest.fixture(params=["exchange", "two-renames"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "exchange":
        if atomic._renameat2 is None:
            pytest.skip("no renameat2 on this system")
        monkeypatch.delenv("LOFIT_TEST_NO_EXCHANGE", raising=False)
    else:
        monkeypatch.setenv("LOFIT_TEST_NO_EXCHANGE", "1")
    return str(request.param)


def write_folder(path: Path, files: dict[str, str]) -> None:
    with atomic_directory(path) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def contents(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def test_module_examples_run() -> None:
    for module in (lofit.io.atomic, lofit.io.locking):
        assert doctest.testmod(module).failed == 0


def test_replacing_a_folder_keeps_nothing_of_the_old_content(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "merged"
    old = {"model-00001-of-00002.safetensors": "a", "model-00002-of-00002.safetensors": "b", "sub/x": "1"}
    write_folder(out, {**old, "model.safetensors.index.json": "{}"})
    inode = out.stat().st_ino
    write_folder(out, {"model.safetensors": "new", "config.json": "{}"})
    # Old shards and index gone; the user's own files (not model content) are carried over.
    assert contents(out) == {"config.json": "{}", "model.safetensors": "new", "sub/x": "1"}
    assert (
        out.stat().st_ino != inode
    )  # a different folder took its place: nothing was copied into the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary or backup left


def test_the_exchange_is_used_where_the_filesystem_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if atomic._renameat2 is None:
        pytest.skip("no renameat2 on this system")
    calls: list[str] = []
    monkeypatch.setattr(atomic.os, "rename", lambda a, b: calls.append(f"{a}->{b}") or os.replace(a, b))
    write_folder(tmp_path / "a", {"config.json": "1"})
    write_folder(tmp_path / "a", {"model.safetensors": "2"})
    assert len(calls) == 2  # the first write (try, succeed) and the second's failed try; no backup renames
    assert contents(tmp_path / "a") == {"model.safetensors": "2"}


def test_a_failing_write_leaves_the_old_folder_and_no_leftover(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "adapter"
    write_folder(out, {"lofit_config.json": "old"})
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(out) as tmp:
        (tmp / "lofit_config.json").write_text("new")
        raise RuntimeError("boom")
    assert contents(out) == {"lofit_config.json": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_keep_existing_discards_the_new_folder(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    write_folder(out, {"marker": "first"})
    with atomic_directory(out, replace_existing=False) as tmp:
        (tmp / "marker").write_text("second")
    assert contents(out) == {"marker": "first"}
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_a_symlinked_folder_is_refused_and_its_destination_untouched(tmp_path: Path, mode: str) -> None:
    real = tmp_path / "real"
    write_folder(real, {"a.safetensors": "old", "stale.bin": "x", "notes.txt": "mine"})
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(atomic.LinkedOutputError, match="is a symbolic link"):
        write_folder(tmp_path / "link", {"a.safetensors": "new"})
    assert (tmp_path / "link").is_symlink()
    assert contents(real) == {"a.safetensors": "old", "stale.bin": "x", "notes.txt": "mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_a_kill_between_the_two_renames_is_recovered_to_the_old_content(tmp_path: Path) -> None:
    # The state a SIGKILL leaves after target -> backup and before temporary -> target.
    write_folder(tmp_path / "adapter", {"lofit_config.json": "old", "lofit_model.safetensors": "old"})
    (tmp_path / "adapter").rename(tmp_path / ".adapter.lofit-old-4242-k3j2h1g0")
    write_folder(
        tmp_path / ".adapter.lofit-tmp-4242-q9w8e7r6", {"lofit_config.json": "new"}
    )  # complete, unpublished
    assert not (tmp_path / "adapter").exists()
    recover(tmp_path / "adapter")
    assert contents(tmp_path / "adapter") == {"lofit_config.json": "old", "lofit_model.safetensors": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_stale_backup_beside_a_complete_folder_is_deleted(tmp_path: Path) -> None:
    write_folder(tmp_path / "adapter", {"x": "new"})
    write_folder(
        tmp_path / ".adapter.lofit-old-4242-k3j2h1g0", {"x": "old"}
    )  # killed while deleting the old content
    write_folder(tmp_path / "adapter", {"x": "newer"})
    assert contents(tmp_path / "adapter") == {"x": "newer"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_reading_an_adapter_restores_it_from_its_backup(tmp_path: Path) -> None:
    from lofit import LofitConfig, LofitModel, get_lofit_model
    from tiny_models import tiny_model

    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads={0: [1]}, init_std=0.1))
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter").rename(tmp_path / ".adapter.lofit-old-4242-k3j2h1g0")
    loaded = LofitModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
    assert loaded.selected_heads() == {0: [1]}


def test_leftovers_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    out = tmp_path / "run"
    write_folder(out, {"heads.json": "{}", "adapter/lofit_config.json": "{}"})
    stale = [
        out / ".adapter.lofit-tmp-4242-abcd1234",
        out / ".heads.json.lofit-tmp-4242-zyxw9876",
        out / "train" / "checkpoints" / ".step-00000003.lofit-removing-4242-0a1b2c3d",
        out / "train" / "checkpoints" / ".step-00000004.lofit-tmp-4242-a1b2c3d4",
    ]
    for path in stale:
        path.mkdir(parents=True) if "json" not in path.name else path.write_text("partial")
    (stale[0] / "lofit_config.json").write_text("partial")
    live = out / ".metrics.json.lofit-tmp-4242-live1234"
    live.write_text("being written")
    user_file = out / ".notes.20240101.tmp"  # no lofit marker: a user's file, whatever it looks like
    user_file.write_text("mine")
    marker = atomic._hold_flock(live)  # as a running writer holds it
    try:
        remove_leftovers(out)
    finally:
        assert marker is not None
        os.close(marker)
    assert not any(path.exists() for path in stale)
    assert live.exists() and user_file.exists()
    assert contents(out / "adapter") == {"lofit_config.json": "{}"}


def test_the_next_write_of_a_file_removes_its_leftovers(tmp_path: Path) -> None:
    (tmp_path / ".heads.json.lofit-tmp-4242-zyxw9876").write_text("partial")
    atomic_write_text(tmp_path / "heads.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["heads.json"]


def test_writing_a_file_over_a_folder_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with (
        pytest.raises(LofitValueError, match="is a folder; give the path of a file"),
        atomic_path(tmp_path / "out"),
    ):
        pass
    (tmp_path / "out" / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        write_folder(tmp_path / "out" / "file", {})


def test_a_temporary_in_use_by_another_process_is_not_removed(tmp_path: Path) -> None:
    live = tmp_path / ".adapter.lofit-tmp-4242-live1234"
    live.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl,os,sys; fd=os.open({str(live)!r}, os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        write_folder(tmp_path / "adapter", {"x": "1"})
        assert live.exists()
    finally:
        holder.communicate("")
    write_folder(tmp_path / "adapter", {"x": "2"})
    assert not live.exists()


def test_a_sweep_of_a_users_folder_touches_only_lofits_leftovers(tmp_path: Path) -> None:
    (tmp_path / ".bashrc").write_text("mine")
    mine = [
        ".bashrc.backup.old",
        ".bashrc.abcd1234.old",
        ".notes.abc1234.tmp",
        ".cache.removing",
        ".x.ABCD1234.tmp",
        ".bashrc.abcd1234.tmp",  # the names of older lofit versions: no marker, so possibly a user's
        ".notes.20240101.tmp",
        ".adapter.lofit-tmp-abcd1234",  # a marker, but no process id
        "adapter.lofit-tmp-1-abcd1234",  # not hidden
    ]
    for name in mine:
        (tmp_path / name).write_text("mine")
    (tmp_path / ".bashrc.lofit-tmp-4242-abcd1234").write_text("a dead lofit write")
    remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".bashrc", *mine])
