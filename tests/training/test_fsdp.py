"""FSDP2: under an FSDP launch (2 CPU processes, gloo) the frozen base is sharded (each process holds about
half of its parameter bytes), the adapter stays whole and trains to what one process trains (1e-5), and
the base is handed back unsharded and unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lofit.selection.select import select_heads
from lofit.training.fsdp import parameter_bytes
from lofit.training.offsets import train_offsets
from tiny_models import tiny_model, tiny_tokenizer

pytest.importorskip("torch.distributed.fsdp", reason="torch has no FSDP")
TESTS = Path(__file__).resolve().parents[1]  # the tests folder (tiny_models.py)
HERE = Path(__file__).resolve().parent  # this file, imported by name in the worker scripts
RECORDS = [
    {"prompt": f"{a}*{b}=", "completion": f"{a * b}" + "." * (a + b)} for a in range(1, 5) for b in range(3)
][:11]
PAIRS = [
    {"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"][::-1] + "?"}
    for r in RECORDS
]
SELECT = {"epochs": 1, "batch_size": 5, "lr": 0.05, "l1": 0.01, "progress": False}
TRAIN = {"epochs": 2, "batch_size": 5, "lr": 0.05, "progress": False}
HEADS = {0: [1, 2], 2: [0, 3]}

SCRIPT = """
import json, os, sys
import torch
from safetensors.torch import save_file
from lofit.selection.select import select_heads
from lofit.training.offsets import train_offsets
from tiny_models import tiny_model, tiny_tokenizer
from test_fsdp import HEADS, PAIRS, RECORDS, SELECT, TRAIN

out = sys.argv[1]
tok = tiny_tokenizer()
base = tiny_model("llama")
selection = select_heads(base, tok, RECORDS, val_data=RECORDS[:4], **SELECT)
sft = train_offsets(base, tok, RECORDS, HEADS, val_data=RECORDS[:3], **TRAIN)
sft_offsets = [p.detach().clone() for p in sft.adapter_parameters()]
sft_history = sft.training_history
plain = sft.unload()
dpo = train_offsets(plain, tok, PAIRS, HEADS, objective="dpo", **TRAIN)
rank = os.environ["RANK"]
tensors = {"scores": selection.scores}
tensors.update({f"sft.{i}": p for i, p in enumerate(sft_offsets)})
tensors.update({f"dpo.{i}": p.detach() for i, p in enumerate(dpo.adapter_parameters())})
base_after = dpo.unload()
kinds = sorted({type(p).__name__ for p in base_after.parameters()})
tensors.update({f"base.{n}": p.detach().contiguous() for n, p in base_after.named_parameters()})
save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/rank{rank}.safetensors")
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"fsdp": sft_history.settings.get("fsdp"), "selection_fsdp": selection.history["settings"].get("fsdp"),
               "losses": sft_history.losses(), "val": [v["val_loss"] for v in sft_history.validation],
               "classes": sorted({type(m).__name__ for m in base_after.modules()}), "kinds": kinds,
               "requires_grad": sorted({p.requires_grad for p in base_after.parameters()})}, f)
"""


def launch(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": f"{TESTS.parent / 'src'}:{TESTS}:{HERE}",
        "ACCELERATE_USE_CPU": "true",
        "ACCELERATE_USE_FSDP": "true",  # what `accelerate launch` sets for an FSDP config
        "FSDP_VERSION": "2",
        "OMP_NUM_THREADS": "1",
    }
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*launcher, str(script), str(tmp_path)], env=env, capture_output=True, timeout=300
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]


def test_fsdp_shards_the_base_and_trains_like_one_process(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    selection = select_heads(tiny_model("llama"), tok, RECORDS, val_data=RECORDS[:4], **SELECT)
    sft = train_offsets(tiny_model("llama"), tok, RECORDS, HEADS, val_data=RECORDS[:3], **TRAIN)
    dpo = train_offsets(tiny_model("llama"), tok, PAIRS, HEADS, objective="dpo", **TRAIN)
    assert "fsdp" not in sft.training_history.settings  # one process: nothing to shard
    full_bytes = parameter_bytes(tiny_model("llama"))
    launch(tmp_path)
    fresh = dict(tiny_model("llama").named_parameters())
    for rank in (0, 1):
        tensors = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        info = json.loads((tmp_path / f"rank{rank}.json").read_text())
        fsdp = info["fsdp"]
        assert fsdp["processes"] == 2 and fsdp["parameter_bytes_full"] >= full_bytes
        # each process keeps half of the base (plus FSDP's padding and the whole, tiny adapter)
        assert fsdp["parameter_bytes_local"] <= 0.52 * fsdp["parameter_bytes_full"]
        assert (
            info["selection_fsdp"]["parameter_bytes_local"]
            <= 0.52 * info["selection_fsdp"]["parameter_bytes_full"]
        )
        assert torch.allclose(tensors["scores"], selection.scores, atol=1e-5, rtol=0)
        for name, model in (("sft", sft), ("dpo", dpo)):
            for index, expected in enumerate(model.adapter_parameters()):
                assert torch.allclose(tensors[f"{name}.{index}"], expected.detach(), atol=1e-5, rtol=0)
        assert info["losses"] == pytest.approx(sft.training_history.losses(), abs=1e-5)
        assert info["val"] == pytest.approx(
            [v["val_loss"] for v in sft.training_history.validation], abs=1e-5
        )
        # handed back as it came: whole tensors, no FSDP classes, the same (untouched) weights
        assert info["kinds"] == ["Parameter"] and not any(c.startswith("FSDP") for c in info["classes"])
        for name, param in fresh.items():
            assert torch.equal(tensors[f"base.{name}"], param.detach()), name


FSDP_YAML = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: "no"
use_cpu: true
fsdp_config:
  fsdp_version: 2
"""


@pytest.mark.slow
def test_lofit_run_under_accelerate_launch_with_an_fsdp_config(tmp_path: Path) -> None:
    """`accelerate launch --config_file fsdp.yaml -m lofit run ...` writes the adapter one process writes."""
    import shutil

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate launcher is not installed next to this Python")
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    test = [{"prompt": r["prompt"], "answers": [r["completion"]]} for r in RECORDS[:3]]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    (tmp_path / "fsdp.yaml").write_text(FSDP_YAML)
    args = ["run", "--model", str(model_dir), "--task", "exact_match", "--train", str(tmp_path / "train.jsonl"),
            "--test", str(tmp_path / "test.jsonl"), "--epochs", "2", "--batch-size", "5", "--k", "5",
            "--precision", "fp32", "--no-progress", "--checkpoint-every", "2"]  # fmt: skip
    # On CPU accelerate's FSDP launcher needs ACCELERATE_USE_CPU to make the processes a (gloo) group.
    env = {
        **os.environ,
        "PYTHONPATH": str(TESTS.parent / "src"),
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
    }
    one = subprocess.run([sys.executable, "-m", "lofit", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr.decode()[-3000:]
    launcher = [accelerate, "launch", "--config_file", str(tmp_path / "fsdp.yaml"), "-m", "lofit"]
    two = subprocess.run(
        [*launcher, *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, timeout=300
    )
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    expected = load_file(str(tmp_path / "one" / "adapter" / "lofit_model.safetensors"))
    got = load_file(str(tmp_path / "two" / "adapter" / "lofit_model.safetensors"))
    assert got.keys() == expected.keys() and sum(t.numel() for t in got.values()) > 0
    assert all(torch.allclose(got[k], expected[k], atol=1e-5, rtol=0) for k in expected)
    heads = [json.loads((tmp_path / d / "heads.json").read_text())["ranking"] for d in ("one", "two")]
    assert heads[0] == heads[1]
    # the checkpoint's history shows that the two processes formed one group and sharded the base
    for step in ("select", "train"):
        (state,) = (tmp_path / "two" / step / "checkpoints").glob("step-*/state.json")
        settings = json.loads(state.read_text())["history"]["settings"]
        assert settings["num_processes"] == 2
        assert settings["fsdp"]["parameter_bytes_local"] <= 0.52 * settings["fsdp"]["parameter_bytes_full"]


FIGURES_SCRIPT = """
import json, os, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from lofit.training.offsets import train_offsets
from tiny_models import tiny_tokenizer
from test_fsdp import HEADS, RECORDS

torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128,
                     bos_token_id=2, eos_token_id=2, pad_token_id=1)
model = train_offsets(LlamaForCausalLM(config).eval(), tiny_tokenizer(), RECORDS, {0: [1, 2], 5: [0, 7]},
                      epochs=1, batch_size=5, lr=0.05, progress=False)
history = model.training_history
if os.environ.get("RANK", "0") == "0":
    offsets = torch.cat([p.detach().flatten() for p in model.adapter_parameters()])
    torch.save(offsets, sys.argv[1] + f"/offsets{history.settings['num_processes']}.pt")
    with open(sys.argv[1] + f"/figures{history.settings['num_processes']}.json", "w") as f:
        json.dump(history.settings.get("fsdp"), f)
"""


@pytest.mark.slow
def test_fsdp_memory_figures_on_a_larger_model(tmp_path: Path) -> None:
    """Per-process parameter bytes with 1 and 2 processes on a 26M-parameter llama; print them (-s)."""
    script = tmp_path / "figures.py"
    script.write_text(FIGURES_SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{TESTS.parent / 'src'}:{TESTS}:{HERE}", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}  # fmt: skip
    one = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, timeout=600
    )
    assert one.returncode == 0, one.stderr.decode()[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run([*launcher, str(script), str(tmp_path)], env=env, capture_output=True, timeout=600)
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    figures = json.loads((tmp_path / "figures2.json").read_text())
    assert json.loads((tmp_path / "figures1.json").read_text()) is None  # one process: nothing sharded
    difference = float(
        (torch.load(tmp_path / "offsets1.pt") - torch.load(tmp_path / "offsets2.pt")).abs().max()
    )
    full, local = figures["parameter_bytes_full"], figures["parameter_bytes_local"]
    print(f"\nparameter bytes per process: N=1 {full:,}  N=2 {local:,} ({local / full:.4f} of N=1); "
          f"max |offsets(N=2) - offsets(N=1)| = {difference:.3g}")  # fmt: skip
    assert local <= 0.51 * full and difference <= 1e-5


def test_weights_never_loaded_are_refused_with_what_to_change() -> None:
    """transformers' FSDP cpu-RAM-efficient loading leaves other ranks' weights on the meta device."""
    from lofit.errors import LofitRuntimeError

    base = tiny_model("llama")
    layer = base.model.layers[1].mlp.down_proj
    layer.weight = torch.nn.Parameter(torch.empty(layer.weight.shape, device="meta"))
    with pytest.raises(LofitRuntimeError, match=r"meta device.*FSDP_CPU_RAM_EFFICIENT_LOADING=false"):
        train_offsets(base, tiny_tokenizer(), RECORDS, HEADS, epochs=1, progress=False)
