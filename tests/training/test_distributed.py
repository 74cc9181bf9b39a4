"""Data-parallel training: 2 CPU processes (torchrun, gloo) select the same heads and train the same
offsets as one process with the same global batch (1e-5), including an empty shard and accumulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lofit.selection.select import select_heads
from lofit.training.offsets import train_offsets
from tiny_models import tiny_model, tiny_tokenizer

TESTS = Path(__file__).resolve().parents[1]  # the tests folder (tiny_models.py)
HERE = Path(__file__).resolve().parent  # this file, imported by name in the worker scripts
# 11 records, batch 5: batches of 5, 5 and 1 records, so the last step leaves one process without data.
RECORDS = [
    {"prompt": f"{a}*{b}=", "completion": f"{a * b}" + "." * (a + b)} for a in range(1, 5) for b in range(3)
][:11]
SELECT = {"epochs": 2, "batch_size": 5, "lr": 0.05, "l1": 0.01, "progress": False}
TRAIN = {"epochs": 2, "batch_size": 5, "lr": 0.05, "progress": False}
K = 5

SCRIPT = """
import json, os, sys
from safetensors.torch import save_file
from lofit.selection.select import select_heads
from lofit.training.offsets import train_offsets
from tiny_models import tiny_model, tiny_tokenizer
from test_distributed import K, RECORDS, SELECT, TRAIN

out, grad_accum = sys.argv[1], int(sys.argv[2])
tok = tiny_tokenizer()
selection = select_heads(tiny_model("llama"), tok, RECORDS, val_data=RECORDS[:4], grad_accum=grad_accum, **SELECT)
model = train_offsets(tiny_model("llama"), tok, RECORDS, selection.top(K), grad_accum=grad_accum, **TRAIN)
rank = os.environ.get("RANK", "0")
tensors = {f"offset.{i}": p.detach().contiguous() for i, p in enumerate(model.adapter_parameters())}
save_file({"scores": selection.scores, **tensors}, f"{out}/rank{rank}.safetensors")
history = model.training_history
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"ranking": selection.ranking, "losses": history.losses(), "world": history.settings["num_processes"],
               "val": [v["val_loss"] for v in selection.history["validation"]]}, f)
"""


def test_two_processes_select_and_train_like_one(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    selection = select_heads(tiny_model("llama"), tok, RECORDS, val_data=RECORDS[:4], **SELECT)
    model = train_offsets(tiny_model("llama"), tok, RECORDS, selection.top(K), **TRAIN)
    reference = [p.detach() for p in model.adapter_parameters()]

    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": f"{TESTS.parent / 'src'}:{TESTS}:{HERE}",
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
    }
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*launcher, str(script), str(tmp_path), "2"], env=env, capture_output=True, timeout=180
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]

    for rank in (0, 1):
        tensors = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        info = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert info["world"] == 2
        assert [tuple(h) for h in info["ranking"]] == selection.ranking
        assert torch.allclose(tensors["scores"], selection.scores, atol=1e-5, rtol=0)
        for index, expected in enumerate(reference):
            assert torch.allclose(tensors[f"offset.{index}"], expected, atol=1e-5, rtol=0)
        assert info["losses"] == [
            pytest_approx(x) for x in model.training_history.losses()
        ]  # the logged loss is the global mean
        assert info["val"] == [pytest_approx(v["val_loss"]) for v in selection.history["validation"]]  # type: ignore[index]


def pytest_approx(value: float):  # type: ignore[no-untyped-def]
    import pytest

    return pytest.approx(value, abs=1e-5)
