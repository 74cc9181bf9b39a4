"""SIGKILL at every named point of an adapter overwrite, a merge, a checkpoint and a file write; two
commands on one output.

Each case runs in a process forked from a "zygote" that imported lofit once (a fresh interpreter costs
~10 s of imports on a busy machine); the child sets `LOFIT_TEST_KILL_AT` (see `lofit.io.atomic.KILL_POINTS`)
and writes; the test then classifies what is left — byte for byte the complete old content, the complete
new content, or a mix (never) — whether lofit loads it, and that the next write leaves no leftovers.
With `LOFIT_KILL_MATRIX=FILE` every case appends its row (JSON) to FILE: the kill matrix of the report.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lofit import LofitConfig, LofitModel, get_lofit_model
from lofit.io.atomic import _LEFTOVER, atomic_write_json
from lofit.io.locking import holder, lock_path
from lofit.training.checkpoints import latest_checkpoint, load_checkpoint
from tiny_models import tiny_model, tiny_tokenizer

TESTS = Path(__file__).resolve().parents[1]  # the tests folder (tiny_models.py)
RECORDS = [
    {"prompt": f"{a}+{b}=", "completion": f"{a + b}" + "!" * (a * b)} for a in range(4) for b in range(3)
]
TRAIN = {"epochs": 2, "batch_size": 5, "lr": 0.05, "progress": False, "group_by_length": True}  # 6 steps
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")


# ------------------------------------------------------------------------ jobs run in the children
def job_save_adapter(source: str, target: str) -> int:
    LofitModel.from_pretrained(tiny_model("llama"), source).save_pretrained(target)
    return 0


def job_cli(argv: list[str]) -> int:
    from lofit.cli.main import main

    sys.argv = ["lofit", *argv]  # as the `lofit` entry point sees it
    return main(argv)


def job_write_json(target: str, data: Any) -> int:
    atomic_write_json(target, data)
    return 0


def job_train(out: str, kill_removing: int | None, final: str | None) -> int:
    """Train with a checkpoint each step (resuming if there is one); optionally die removing a checkpoint."""
    from lofit.training.offsets import train_offsets

    if kill_removing is not None:
        rmtree = shutil.rmtree

        def dying_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
            if f".step-{kill_removing - 1:08d}.lofit-removing-" in Path(path).name:
                os.kill(os.getpid(), signal.SIGKILL)
            rmtree(path, *args, **kwargs)

        shutil.rmtree = dying_rmtree  # type: ignore[assignment]
    model = train_offsets(
        tiny_model("llama"), tiny_tokenizer(), RECORDS, {0: [1], 2: [0, 3]}, output_dir=out,
        checkpoint_every=1, resume=True, **TRAIN,
    )  # fmt: skip
    if final is not None:
        model.save_pretrained(final)
    return 0


def zygote() -> None:
    """Fork one child per job read from stdin (JSON lines); report its pid and, unless async, its end."""
    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        if "wait" in job:
            _report(job["wait"])
            continue
        pid = os.fork()
        if pid == 0:
            _child(job)
        print(json.dumps({"pid": pid}), flush=True)
        if not job.get("async"):
            _report(pid)


def _child(job: dict[str, Any]) -> None:
    code = 99
    try:
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdin.close()
        os.environ.update(job.get("env", {}))
        code = int(globals()[job["fn"]](*job["args"]) or 0)
    except SystemExit as error:
        code = int(error.code or 0)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _report(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    killed = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    print(
        json.dumps({"signal": killed, "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}),
        flush=True,
    )


class Zygote:
    def __init__(self, work: Path) -> None:
        self.work = work
        here = Path(__file__).resolve().parent  # this file, imported by name in the zygote
        env = {**os.environ, "PYTHONPATH": f"{TESTS.parent / 'src'}:{TESTS}:{here}", "OMP_NUM_THREADS": "1"}
        env.pop("LOFIT_TEST_KILL_AT", None)
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import test_kills; test_kills.zygote()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=work,
        )  # fmt: skip
        assert self._read() == "ready"
        self.count = 0

    def _read(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, "the zygote process died"
        return line.strip()

    def _send(self, job: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()

    def start(self, fn: str, *args: Any, env: dict[str, str] | None = None) -> tuple[int, Path]:
        self.count += 1
        log = self.work / f"job-{self.count}.log"
        self._send({"fn": fn, "args": list(args), "env": env or {}, "log": str(log), "async": True})
        return json.loads(self._read())["pid"], log

    def wait(self, pid: int) -> dict[str, Any]:
        self._send({"wait": pid})
        return dict(json.loads(self._read()))

    def run(self, fn: str, *args: Any, env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
        pid, log = self.start(fn, *args, env=env)
        return self.wait(pid), log.read_text()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    process = Zygote(tmp_path_factory.mktemp("zygote"))
    yield process
    process.close()


# ---------------------------------------------------------------------------------- classification
def snapshot(path: Path) -> dict[str, bytes] | None:
    if not path.is_dir():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def state(path: Path, old: dict[str, bytes] | None, new: dict[str, bytes]) -> str:
    now = snapshot(path)
    if now is None:
        return "missing"
    return "old" if now == old else "new" if now == new else "MIX"


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if _LEFTOVER.match(p.name))


def record(row: dict[str, Any]) -> None:
    matrix = os.environ.get("LOFIT_KILL_MATRIX")
    if matrix:
        with open(matrix, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def kill_env(point: str, name: str, mode: str) -> dict[str, str]:
    env = {"LOFIT_TEST_KILL_AT": f"{point}@{name}"}
    if mode == "two-renames":
        env["LOFIT_TEST_NO_EXCHANGE"] = "1"
    return env


MODES = ["exchange", "two-renames"]
SLOW = pytest.mark.slow  # the whole matrix: run with -m slow; the default suite keeps the riskiest cases
DIR_POINTS = [
    pytest.param("dir-built", "exchange", "old", marks=SLOW),
    ("dir-swapped", "exchange", "new"),
    pytest.param("dir-built", "two-renames", "old", marks=SLOW),
    ("dir-backed-up", "two-renames", "missing"),
    pytest.param("dir-swapped", "two-renames", "new", marks=SLOW),
]


# ----------------------------------------------------------------------------------------- adapters
@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    get_lofit_model(tiny_model("llama"), LofitConfig(heads={0: [1]}, init_std=0.1)).save_pretrained(
        root / "a"
    )
    get_lofit_model(
        tiny_model("llama"), LofitConfig(heads={1: [0, 2], 2: [3]}, use_scale=True, init_std=0.2)
    ).save_pretrained(root / "b")
    for name in ("a", "b"):  # what a load + save writes (init_std is 0 once loaded)
        LofitModel.from_pretrained(tiny_model("llama"), root / name).save_pretrained(root / f"{name}-saved")
    return {
        "old_source": root / "a",
        "new_source": root / "b",
        "old": root / "a-saved",
        "new": root / "b-saved",
    }


@pytest.mark.parametrize(("point", "mode", "expected"), DIR_POINTS)
def test_adapter_overwrite_killed(
    zygote_process: Zygote, adapters: dict[str, Path], tmp_path: Path, point: str, mode: str, expected: str
) -> None:
    target = tmp_path / "adapter"
    shutil.copytree(adapters["old"], target)
    old, new = snapshot(adapters["old"]), snapshot(adapters["new"])
    assert new is not None
    status, log = zygote_process.run(
        "job_save_adapter", str(adapters["new_source"]), str(target), env=kill_env(point, "adapter", mode)
    )
    assert status["signal"] == signal.SIGKILL, log  # the kill point was reached
    left = state(target, old, new)
    litter = leftovers(tmp_path)
    loaded = LofitModel.from_pretrained(tiny_model("llama"), target).selected_heads()  # recovers if needed
    loaded_as = {"{0: [1]}": "old", "{1: [0, 2], 2: [3]}": "new"}[str(loaded)]
    after_read = state(target, old, new)
    LofitModel.from_pretrained(tiny_model("llama"), adapters["new_source"]).save_pretrained(target)
    row = {
        "operation": "adapter overwrite (save_pretrained)", "kill point": point, "swap": mode,
        "left at target": left, "leftovers": litter, "lofit loads": loaded_as,
        "after next write": {"state": state(target, old, new), "leftovers": leftovers(tmp_path)},
    }  # fmt: skip
    record(row)
    assert left == expected
    assert after_read == (expected if expected != "missing" else "old")
    assert loaded_as == after_read
    assert row["after next write"] == {"state": "new", "leftovers": []}


# ------------------------------------------------------------------------------------------- merges
@pytest.fixture(scope="module")
def merge_setup(tmp_path_factory: pytest.TempPathFactory, adapters: dict[str, Path]) -> dict[str, Path]:
    from lofit.cli.main import main

    root = tmp_path_factory.mktemp("merge")
    base = root / "base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    sharded = root / "sharded"  # the old content: another model's sharded checkpoint
    tiny_model("llama", seed=2).save_pretrained(sharded, max_shard_size="40KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    (sharded / "notes.txt").write_text("the user's own file")
    assert (
        main(
            [
                "merge",
                "--model",
                str(base),
                "--adapter",
                str(adapters["new_source"]),
                "--out",
                str(root / "new"),
            ]
        )
        == 0
    )
    (root / "new" / "notes.txt").write_text("the user's own file")  # what a merge over `sharded` keeps
    return {"base": base, "old": sharded, "new": root / "new", "adapter": adapters["new_source"]}


def _loads_as(path: Path, setup: dict[str, Path]) -> str:
    from transformers import AutoModelForCausalLM

    if not path.is_dir():
        return "nothing (missing)"
    model = AutoModelForCausalLM.from_pretrained(path)
    weights = model.model.layers[0].self_attn.o_proj
    for name in ("old", "new"):
        reference = AutoModelForCausalLM.from_pretrained(setup[name]).model.layers[0].self_attn.o_proj
        if torch.equal(weights.weight, reference.weight) and (weights.bias is None) == (
            reference.bias is None
        ):
            return name
    return "MIX"


@pytest.mark.parametrize(("point", "mode", "expected"), DIR_POINTS)
def test_merge_over_a_sharded_checkpoint_killed(
    zygote_process: Zygote, merge_setup: dict[str, Path], tmp_path: Path, point: str, mode: str, expected: str
) -> None:
    from lofit.io.atomic import recover

    target = tmp_path / "merged"
    shutil.copytree(merge_setup["old"], target)
    old, new = snapshot(merge_setup["old"]), snapshot(merge_setup["new"])
    assert new is not None
    argv = [
        "merge",
        "--model",
        str(merge_setup["base"]),
        "--adapter",
        str(merge_setup["adapter"]),
        "--out",
        str(target),
        "--overwrite",  # the old content is another model's checkpoint, not lofit's
    ]
    status, log = zygote_process.run("job_cli", argv, env=kill_env(point, "merged", mode))
    assert status["signal"] == signal.SIGKILL, log
    left = state(target, old, new)
    litter = leftovers(tmp_path)
    plain = _loads_as(target, merge_setup)  # what plain transformers finds before any lofit command runs
    stale_lock = lock_path(target).exists() and holder(target) is None
    recover(target)  # what the next lofit command does first
    after_recovery = state(target, old, new)
    status, log = zygote_process.run("job_cli", argv)
    row = {
        "operation": "merge over a sharded checkpoint (lofit merge)", "kill point": point, "swap": mode,
        "left at target": left, "leftovers": litter, "transformers loads": plain,
        "after lofit's recovery": after_recovery, "stale lock taken over": stale_lock and status["code"] == 0,
        "after next merge": {"state": state(target, old, new), "leftovers": leftovers(tmp_path),
                             "lock file": lock_path(target).exists()},
    }  # fmt: skip
    record(row)
    assert left == expected
    assert plain == (expected if expected != "missing" else "nothing (missing)")
    assert after_recovery == (expected if expected != "missing" else "old")
    assert stale_lock and status["code"] == 0, log
    assert row["after next merge"] == {"state": "new", "leftovers": [], "lock file": False}


# -------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def uninterrupted(
    zygote_process: Zygote, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("uninterrupted")
    status, log = zygote_process.run("job_train", str(root / "run"), None, str(root / "final"))
    assert status == {"signal": 0, "code": 0}, log
    return load_file(str(root / "final" / "lofit_model.safetensors"))


CHECKPOINT_CASES = [
    # step 4 complete in its temporary folder, not yet in place
    pytest.param("dir-built@step-00000004", None, 3, marks=SLOW),
    # step 4 in place, step 3 not yet removed
    pytest.param("dir-swapped@step-00000004", None, 4, marks=SLOW),
    # the log is rewritten at the end of epoch 1 (step 3), before that step's checkpoint
    pytest.param("file-replaced@train_log.jsonl", None, 2, marks=SLOW),
    # removing step 3 after step 4 is in place (killed in the middle of the deletion)
    pytest.param(None, 4, 4, marks=SLOW),
    # the same at the last step: the resume saves nothing, yet must clean up
    (None, 6, 6),
]


@pytest.mark.parametrize(("kill_at", "kill_removing", "resumes_from"), CHECKPOINT_CASES)
def test_checkpoint_killed_then_resumed(
    zygote_process: Zygote, uninterrupted: dict[str, torch.Tensor], tmp_path: Path,
    kill_at: str | None, kill_removing: int | None, resumes_from: int,
) -> None:  # fmt: skip
    out = tmp_path / "run"
    env = {"LOFIT_TEST_KILL_AT": kill_at} if kill_at else {}
    status, log = zygote_process.run("job_train", str(out), kill_removing, None, env=env)
    assert status["signal"] == signal.SIGKILL, log
    litter = leftovers(out)
    latest = latest_checkpoint(out / "checkpoints")
    assert latest is not None
    step = load_checkpoint(latest).position.step  # loadable: complete
    status, log = zygote_process.run("job_train", str(out), None, str(tmp_path / "final"))
    assert status == {"signal": 0, "code": 0}, log
    final = load_file(str(tmp_path / "final" / "lofit_model.safetensors"))
    same = all(torch.allclose(final[k], uninterrupted[k], atol=1e-6, rtol=0) for k in uninterrupted)
    row = {
        "operation": "training checkpoint (checkpoint_every=1, 6 steps)",
        "kill point": kill_at or f"deleting step {kill_removing - 1 if kill_removing else 0} (.removing)",
        "left": f"latest complete checkpoint step {step}", "leftovers": litter,
        "resume": "final adapter equals the uninterrupted run" if same else "DIFFERENT",
        "leftovers after resume": leftovers(out),
    }  # fmt: skip
    record(row)
    assert step == resumes_from
    assert same
    assert row["leftovers after resume"] == []


# -------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize(("point", "expected"), [("file-written", "old"), ("file-replaced", "new")])
def test_file_overwrite_killed(zygote_process: Zygote, tmp_path: Path, point: str, expected: str) -> None:
    target = tmp_path / "heads.json"
    target.write_text('{"old": true}\n')
    status, log = zygote_process.run(
        "job_write_json", str(target), {"new": True}, env={"LOFIT_TEST_KILL_AT": f"{point}@heads.json"}
    )
    assert status["signal"] == signal.SIGKILL, log
    left = {'{"old": true}\n': "old", '{\n  "new": true\n}\n': "new"}.get(target.read_text(), "MIX")
    litter = leftovers(tmp_path)
    atomic_write_json(target, {"newer": True})
    record({
        "operation": "file overwrite (heads.json, metrics.json, ...)", "kill point": point,
        "left at target": left, "leftovers": litter, "after next write": {"leftovers": leftovers(tmp_path)},
    })  # fmt: skip
    assert left == expected
    assert leftovers(tmp_path) == []


# -------------------------------------------------------------------------------------- concurrency
def _wait_for_holder(out: Path, pid: int, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        info = holder(out)
        if info is not None and info.get("pid") == pid:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} never took the lock: {log.read_text()[-2000:]}")


def test_two_commands_on_one_output(
    zygote_process: Zygote, merge_setup: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    argv = [
        "merge",
        "--model",
        str(merge_setup["base"]),
        "--adapter",
        str(merge_setup["adapter"]),
        "--out",
        str(out),
    ]
    first, first_log = zygote_process.start("job_cli", argv)
    _wait_for_holder(out, first, first_log)
    os.kill(first, signal.SIGSTOP)  # hold it there, lock taken, while the second command runs
    try:
        second, second_log = zygote_process.run("job_cli", argv)
    finally:
        os.kill(first, signal.SIGCONT)
    first_status = zygote_process.wait(first)
    record({
        "operation": "two `lofit merge` on one --out", "first": first_status, "second": second,
        "second says": second_log.strip().splitlines()[-1][:200],
    })  # fmt: skip
    assert second == {"signal": 0, "code": 2}
    assert f"is being written by process {first} on " in second_log
    assert "`lofit merge --model" in second_log
    assert first_status == {"signal": 0, "code": 0}, first_log.read_text()
    assert _loads_as(out, merge_setup) == "new"  # the first command's output, untouched by the second


def test_a_killed_commands_lock_is_taken_over(
    zygote_process: Zygote, merge_setup: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    argv = [
        "merge",
        "--model",
        str(merge_setup["base"]),
        "--adapter",
        str(merge_setup["adapter"]),
        "--out",
        str(out),
    ]
    status, _ = zygote_process.run("job_cli", argv, env={"LOFIT_TEST_KILL_AT": "dir-built@merged"})
    assert status["signal"] == signal.SIGKILL
    assert lock_path(out).exists() and holder(out) is None  # left behind, held by nobody
    status, log = zygote_process.run("job_cli", argv)
    assert status == {"signal": 0, "code": 0}, log
    assert "took over the lock left by process" in log
    assert _loads_as(out, merge_setup) == "new"
    assert not lock_path(out).exists() and leftovers(tmp_path) == []


def test_two_selects_on_one_run_folder(
    zygote_process: Zygote, merge_setup: dict[str, Path], tmp_path: Path
) -> None:
    from lofit.selection.ranking import HeadSelection

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "run"
    argv = ["select", "--model", str(merge_setup["base"]), "--task", "sft", "--train", str(train),
            "--out", str(out), "--epochs", "1", "--batch-size", "4", "--no-progress"]  # fmt: skip
    first, first_log = zygote_process.start("job_cli", argv)
    _wait_for_holder(out, first, first_log)
    os.kill(first, signal.SIGSTOP)
    try:
        second, second_log = zygote_process.run(
            "job_cli", [a if a != "1" else "2" for a in argv]
        )  # --epochs 2
    finally:
        os.kill(first, signal.SIGCONT)
    assert second == {"signal": 0, "code": 2}
    assert (
        f"{out} is being written by process {first}" in second_log and "`lofit select --model" in second_log
    )
    assert zygote_process.wait(first) == {"signal": 0, "code": 0}, first_log.read_text()
    assert HeadSelection.load(out / "heads.json").num_layers == 3  # the first run's output, complete
    assert not lock_path(out).exists() and leftovers(tmp_path) == []
