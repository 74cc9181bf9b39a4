"""Checkpoints and --resume: a run killed (SIGKILL) mid-epoch and resumed ends exactly where an
uninterrupted run ends; checkpoints are atomic, validated, pickle-free, and survive a NaN."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lofit import LofitConfig, get_lofit_model
from lofit.selection.select import select_heads
from lofit.training.checkpoints import (
    STATE_NAME,
    TENSORS_NAME,
    CheckpointError,
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
)
from lofit.training.loop import train_adapter
from lofit.training.losses import SFTObjective
from lofit.training.offsets import train_offsets
from lofit.training.settings import TrainingConfig
from lofit.training.step import NonFiniteLossError
from tiny_models import tiny_model, tiny_tokenizer

TESTS = Path(__file__).resolve().parents[1]  # the tests folder (tiny_models.py)
RECORDS = [
    {"prompt": f"{a}+{b}=", "completion": f"{a + b}" + "!" * (a * b)} for a in range(4) for b in range(3)
]
HEADS = {0: [1], 2: [0, 3]}
# 12 records, batch 5: 3 steps per epoch (the last one of 2 records), 6 steps in all.
OPTIONS = {"epochs": 2, "batch_size": 5, "lr": 0.05, "progress": False, "group_by_length": True}

KILL_SCRIPT = """
import os, signal, sys
import torch
from safetensors.torch import save_file
import lofit.training.checkpoints, lofit.training.loop
from lofit.training.offsets import train_offsets
from tiny_models import tiny_model, tiny_tokenizer

out, kill_step, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
records = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}" + "!" * (a * b)} for a in range(4) for b in range(3)]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if where == "after":  # right after checkpoint `kill_step` is in place
    save = lofit.training.loop.save_checkpoint
    def patched(root, position, **kwargs):
        path = save(root, position, **kwargs)
        if position.step == kill_step:
            die()
        return path
    lofit.training.loop.save_checkpoint = patched
else:  # while checkpoint `kill_step` is half written (tensors saved, not yet renamed into place)
    save_file = lofit.training.checkpoints.save_file
    def patched_save_file(tensors, path, metadata=None):
        save_file(tensors, path, metadata=metadata)
        if f"step-{kill_step:08d}" in path:
            die()
    lofit.training.checkpoints.save_file = patched_save_file

train_offsets(tiny_model("llama"), tiny_tokenizer(), records, {0: [1], 2: [0, 3]}, epochs=2, batch_size=5,
              lr=0.05, progress=False, group_by_length=True, output_dir=out, checkpoint_every=1)
"""


def offsets(model) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return [p.detach().cpu().clone() for p in model.adapter_parameters()]


def train(**extra):  # type: ignore[no-untyped-def]
    return train_offsets(tiny_model("llama"), tiny_tokenizer(), RECORDS, HEADS, **{**OPTIONS, **extra})


@pytest.fixture(scope="module")
def uninterrupted():  # type: ignore[no-untyped-def]
    return train()


def kill_run(tmp_path: Path, kill_step: int, where: str) -> Path:
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{TESTS.parent / 'src'}:{TESTS}"}
    result = subprocess.run(
        [sys.executable, str(script), str(out), str(kill_step), where],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    return out


@pytest.mark.parametrize(
    ("kill_step", "where", "resumed_from"),
    [(4, "after", 4), (5, "during", 4)],
    ids=["killed-after-checkpoint", "killed-while-writing-checkpoint"],
)
def test_sigkilled_run_resumes_to_the_uninterrupted_result(  # type: ignore[no-untyped-def]
    tmp_path, uninterrupted, kill_step, where, resumed_from
) -> None:
    out = kill_run(tmp_path, kill_step, where)
    checkpoints = out / "checkpoints"
    # Killed mid-epoch 2 (step 4 is its first batch): only complete checkpoints count, one is kept.
    assert [p.name for p in list_checkpoints(checkpoints)] == [f"step-{resumed_from:08d}"]
    leftovers = [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]
    assert bool(leftovers) == (where == "during")  # the half-written one is hidden, never read
    position = load_checkpoint(latest_checkpoint(checkpoints)).position  # type: ignore[arg-type]
    assert (position.step, position.epoch, position.batch) == (resumed_from, 2, 1)

    resumed = train(output_dir=str(out), checkpoint_every=1, resume=True)
    for a, b in zip(offsets(uninterrupted), offsets(resumed), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)  # (bit-identical on one machine, in practice)
    assert resumed.training_history.losses() == pytest.approx(
        uninterrupted.training_history.losses(), abs=1e-6
    )
    assert resumed.training_history.settings["resumed_from_step"] == resumed_from
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # stale temporaries removed
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-00000006"]  # the final one
    assert sorted(p.name for p in (checkpoints / "step-00000006").iterdir()) == sorted(
        [TENSORS_NAME, STATE_NAME]
    )


def interrupt_after(monkeypatch, step: int) -> None:  # type: ignore[no-untyped-def]
    """Make the next run stop (KeyboardInterrupt) right after writing checkpoint `step`."""
    import lofit.training.loop

    save = lofit.training.loop.save_checkpoint

    def patched(root, position, **rest):  # type: ignore[no-untyped-def]
        path = save(root, position, **rest)
        if position.step == step:
            monkeypatch.setattr(lofit.training.loop, "save_checkpoint", save)
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(lofit.training.loop, "save_checkpoint", patched)


def test_selection_interrupted_and_resumed_gives_the_same_ranking(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    tok, kwargs = (
        tiny_tokenizer(),
        {**OPTIONS, "l1": 0.01, "output_dir": str(tmp_path), "checkpoint_every": 2},
    )
    reference = select_heads(
        tiny_model("gpt2"), tok, RECORDS, **{**kwargs, "output_dir": None, "checkpoint_every": 0}
    )
    base = tiny_model("gpt2")
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        select_heads(base, tok, RECORDS, **kwargs)
    resumed = select_heads(base, tok, RECORDS, **kwargs, resume=True)
    assert resumed.history is not None and resumed.history["settings"]["resumed_from_step"] == 2
    assert resumed.ranking == reference.ranking
    assert torch.allclose(resumed.scores, reference.scores, atol=1e-6, rtol=0)


def test_resuming_with_other_grad_accum_gives_the_same_offsets(tmp_path, monkeypatch, uninterrupted) -> None:  # type: ignore[no-untyped-def]
    interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        train(output_dir=str(tmp_path), checkpoint_every=1)
    again = train(output_dir=str(tmp_path), checkpoint_every=1, resume=True, grad_accum=2)
    assert again.training_history.settings["resumed_from_step"] == 4
    for a, b in zip(offsets(uninterrupted), offsets(again), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    finished = train(output_dir=str(tmp_path), checkpoint_every=1, resume=True)  # nothing left to do
    assert finished.training_history.settings["resumed_from_step"] == 6
    assert all(torch.equal(a, b) for a, b in zip(offsets(again), offsets(finished), strict=True))


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    train(output_dir=str(tmp_path), checkpoint_every=3)
    with pytest.raises(CheckpointError, match=r"lr=0\.05, but this run has lr=0\.1; resume with the same"):
        train(output_dir=str(tmp_path), checkpoint_every=3, resume=True, lr=0.1)
    other_data = [dict(r, completion=r["completion"] + "?") for r in RECORDS]
    with pytest.raises(CheckpointError, match="train_data_sha256"):
        train_offsets(
            tiny_model("llama"),
            tiny_tokenizer(),
            other_data,
            HEADS,
            **OPTIONS,
            output_dir=str(tmp_path),
            resume=True,
        )
    with pytest.raises(CheckpointError, match="heads="):
        train_offsets(
            tiny_model("llama"), tiny_tokenizer(), RECORDS, {0: [0], 2: [0, 3]}, **OPTIONS,
            output_dir=str(tmp_path), resume=True,
        )  # fmt: skip


def test_a_fresh_run_does_not_overwrite_existing_checkpoints(tmp_path) -> None:  # type: ignore[no-untyped-def]
    train(output_dir=str(tmp_path), checkpoint_every=3)
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run .*resume=True"):
        train(output_dir=str(tmp_path), checkpoint_every=3)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000006"]


def test_resume_without_a_checkpoint_starts_afresh(tmp_path, uninterrupted, caplog) -> None:  # type: ignore[no-untyped-def]
    model = train(output_dir=str(tmp_path), checkpoint_every=4, resume=True)
    assert "holds no checkpoint; starting afresh" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(offsets(model), offsets(uninterrupted), strict=True))
    with pytest.raises(ValueError, match="need output_dir or checkpoint_dir"):
        TrainingConfig(checkpoint_every=5)


@pytest.mark.parametrize("damage", ["truncate", "garbage-json", "missing-file", "wrong-format"])
def test_a_damaged_checkpoint_gives_a_clear_error(tmp_path, damage: str) -> None:  # type: ignore[no-untyped-def]
    train(output_dir=str(tmp_path), checkpoint_every=3)
    path = latest_checkpoint(tmp_path / "checkpoints")
    assert path is not None
    tensors, state = path / TENSORS_NAME, path / STATE_NAME
    if damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
        expected = r"state\.safetensors: cannot read safetensors .*corrupt or truncated"
    elif damage == "garbage-json":
        state.write_text("{not json")
        expected = r"state\.json: not valid JSON"
    elif damage == "missing-file":
        tensors.unlink()
        expected = r"state\.safetensors is missing; .* is not a complete lofit checkpoint"
    else:
        state.write_text(json.dumps({"format": "something-else"}))
        expected = "not a lofit checkpoint"
    with pytest.raises(CheckpointError, match=expected):
        train(output_dir=str(tmp_path), checkpoint_every=3, resume=True)


def test_checkpoints_hold_no_pickle_and_every_state_part(tmp_path) -> None:  # type: ignore[no-untyped-def]
    train(output_dir=str(tmp_path), checkpoint_every=2)
    path = latest_checkpoint(tmp_path / "checkpoints")
    assert path is not None
    tensors = load_file(str(path / TENSORS_NAME))
    document = json.loads((path / STATE_NAME).read_text())
    assert {"param.0", "optimizer.0.exp_avg", "optimizer.0.exp_avg_sq", "optimizer.0.step"} <= set(tensors)
    assert {"rng.torch", "rng.numpy", "data.generator"} <= set(tensors)
    assert document["position"] == {
        "step": 6, "epoch": 3, "batch": 0, "tokens_seen": document["position"]["tokens_seen"],
        "elapsed_s": document["position"]["elapsed_s"],
    }  # fmt: skip
    assert document["scheduler"]["last_epoch"] == 6
    assert len(document["history"]["steps"]) == 6
    assert document["identity"]["lr"] == 0.05 and document["identity"]["seed"] == 42


def test_rng_states_round_trip() -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    tensors, values = capture_rng()
    tensors, values = load_via_disk(tensors, values)
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(tensors, values)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1]) and first[2] == second[2]


def load_via_disk(tensors, values):  # type: ignore[no-untyped-def]
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rng.safetensors"
        save_file(tensors, str(path))
        return load_file(str(path)), json.loads(json.dumps(values))


class NaNAtCall(SFTObjective):
    """SFT whose loss turns NaN on the `bad_call`-th training micro-batch."""

    def __init__(self, tokenizer, bad_call: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__(tokenizer)
        self.calls, self.bad_call = 0, bad_call

    def loss(self, scorer, examples, device):  # type: ignore[no-untyped-def]
        out = super().loss(scorer, examples, device)
        self.calls += 1
        if self.calls == self.bad_call:
            out.loss_sum = out.loss_sum * float("nan")
        return out


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tok = tiny_tokenizer()
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS))
    objective = NaNAtCall(tok, bad_call=5)
    config = TrainingConfig(**OPTIONS, output_dir=str(tmp_path), checkpoint_every=2)
    with pytest.raises(NonFiniteLossError) as caught:
        train_adapter(model, objective, objective.encode(RECORDS), config)
    message = str(caught.value)
    assert "the loss became nan at step 5 (epoch 2); training stopped. Lower lr" in message
    assert f"The last good checkpoint (step-00000004) is kept in {tmp_path / 'checkpoints'}" in message
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "step-00000004")
    assert checkpoint.position.step == 4
    assert all(torch.isfinite(t).all() for k, t in checkpoint.tensors.items() if k.startswith("param."))


def test_an_interrupted_run_with_cached_lower_layers_resumes_to_the_uncached_result(
    tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """`lofit run` caches by default (`--cache-lower-layers auto`): a resumed run refills the cache and ends
    where a run without any cache ends."""
    heads = {1: [0], 2: [1, 3]}  # nothing in layer 0: layer 0 is cached

    def run(**extra):  # type: ignore[no-untyped-def]
        return train_offsets(tiny_model("llama"), tiny_tokenizer(), RECORDS, heads, **{**OPTIONS, **extra})

    plain = run()
    interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run(output_dir=str(tmp_path), checkpoint_every=1, cache_lower_layers="auto")
    resumed = run(output_dir=str(tmp_path), checkpoint_every=1, resume=True, cache_lower_layers="auto")
    history = resumed.training_history
    assert history.settings["resumed_from_step"] == 4 and history.summary["lower_layer_cache"]["layer"] == 1
    assert history.summary["lower_layer_cache"]["replayed_forwards"] > 0
    for a, b in zip(offsets(plain), offsets(resumed), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert history.losses() == pytest.approx(
        plain.training_history.losses()[-len(history.losses()) :], abs=1e-5
    )
