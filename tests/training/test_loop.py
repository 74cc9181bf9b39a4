"""The training loop: optimizer/schedule oracles, reproducibility, accumulation, logs and failures."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lofit import LofitConfig, get_lofit_model
from lofit.adapters.layer import LofitProjection
from lofit.training.batching import epoch_batches
from lofit.training.history import TrainingHistory
from lofit.training.logprobs import TokenScorer
from lofit.training.loop import train_adapter
from lofit.training.losses import SFTObjective, make_objective
from lofit.training.offsets import train_offsets
from lofit.training.settings import TrainingConfig
from lofit.training.step import NonFiniteLossError
from tiny_models import tiny_model, tiny_tokenizer

RECORDS = [
    {"prompt": f"{a}+{b}=", "completion": f"{a + b}" + "!" * (a * b)} for a in range(4) for b in range(3)
]
DPO_RECORDS = [{"prompt": f"{a}?", "chosen": f" {a}", "rejected": f" {a + 1}"} for a in range(8)]
HEADS = {0: [1], 2: [0, 3]}


def offsets(model) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return [p.detach().cpu().clone() for p in model.adapter_parameters()]


def quiet(**kwargs):  # type: ignore[no-untyped-def]
    return {"progress": False, **kwargs}


def test_runs_are_bit_reproducible() -> None:
    tok = tiny_tokenizer()
    runs = [
        train_offsets(tiny_model("llama"), tok, RECORDS, HEADS, **quiet(epochs=2, batch_size=4, seed=seed))
        for seed in (42, 42, 7)
    ]
    first, second, other = (offsets(m) for m in runs)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert runs[0].training_history.losses() == runs[1].training_history.losses()
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize(("objective", "records"), [("sft", RECORDS), ("dpo", DPO_RECORDS)])
def test_gradient_accumulation_does_not_change_the_result(objective: str, records: list[dict]) -> None:
    tok = tiny_tokenizer()
    results = [
        offsets(
            train_offsets(
                tiny_model("gpt2"),
                tok,
                records,
                HEADS,
                objective,
                **quiet(epochs=2, batch_size=4, grad_accum=accum, init_std=0.0),
            )
        )
        for accum in (1, 2, 4)
    ]
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_first_step_matches_hand_computed_loss_gradient_and_adam_update(weight_decay: float) -> None:
    tok = tiny_tokenizer()
    torch.manual_seed(3)
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads=None, use_scale=True, use_offset=False))
    oracle = copy.deepcopy(model)
    l1, lr = 0.05, 0.01
    # Hand computation: token-mean cross-entropy over all records + l1 * Σ|A|, one full batch.
    objective = SFTObjective(tok)
    examples = objective.encode(RECORDS)
    out = objective.loss(TokenScorer(oracle, "full"), examples, "cpu")
    scales = oracle.adapter_parameters()
    task = out.loss_sum / out.units
    penalty = l1 * sum(s.abs().sum() for s in scales)
    (task + penalty).backward()
    grads = [s.grad.clone() for s in scales]
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    before = offsets(model)

    config = TrainingConfig(
        epochs=1, batch_size=len(RECORDS), lr=lr, weight_decay=weight_decay, progress=False
    )
    params = model.adapter_parameters()
    history = train_adapter(
        model,
        SFTObjective(tok),
        objective.encode(RECORDS),
        config,
        regularizer=lambda: l1 * sum(p.abs().sum() for p in params),
    )
    step = history.steps[0]
    assert step["loss"] == pytest.approx(float(task.detach()), rel=1e-5)
    assert step["penalty"] == pytest.approx(float(penalty.detach()), rel=1e-5)
    assert step["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
    assert step["lr"] == lr
    clip = min(1.0, 1.0 / (float(norm) + 1e-6))
    for old, new, grad in zip(before, offsets(model), grads, strict=True):
        g = grad * clip  # AdamW's first step: m̂ = g, v̂ = g², update = lr · g / (|g| + ε)
        expected = old * (1 - lr * weight_decay) - lr * g / (g.abs() + 1e-8)  # decoupled weight decay
        assert torch.allclose(new, expected, atol=1e-7)


def test_gradient_clipping_scales_the_gradient_to_max_norm() -> None:
    from lofit.training.distributed import clip_gradients as _clip
    from lofit.training.distributed import make_accelerator

    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.tensor([6.0, 8.0, 0.0, 0.0])
    assert _clip(make_accelerator("fp32"), [param], 1.0) == pytest.approx(10.0)
    assert torch.allclose(param.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]), atol=1e-6)


def test_learning_rate_decays_linearly_to_zero_with_optional_warmup() -> None:
    tok = tiny_tokenizer()
    plain = train_offsets(tiny_model("llama"), tok, RECORDS, HEADS, **quiet(epochs=2, batch_size=3, lr=0.1))
    lrs = [s["lr"] for s in plain.training_history.steps]
    assert lrs == pytest.approx([0.1 * (8 - s) / 8 for s in range(8)])
    warm = train_offsets(
        tiny_model("llama"), tok, RECORDS, HEADS, **quiet(epochs=2, batch_size=3, lr=0.1, warmup_ratio=0.25)
    )
    lrs = [s["lr"] for s in warm.training_history.steps]
    assert lrs == pytest.approx([0.0, 0.05, 0.1, *(0.1 * (8 - s) / 6 for s in range(3, 8))])


def test_validation_loss_each_epoch_and_files_in_output_dir(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tok = tiny_tokenizer()
    model = train_offsets(
        tiny_model("llama"),
        tok,
        RECORDS[:8],
        HEADS,
        val_data=RECORDS[8:],
        **quiet(epochs=3, batch_size=4, output_dir=str(tmp_path)),
    )
    history = model.training_history
    assert [v["epoch"] for v in history.validation] == [0, 1, 2, 3]
    assert all(v["val_loss"] > 0 for v in history.validation)
    assert history.summary["steps"] == 6 and history.summary["tokens_per_s"] > 0
    assert history.summary["logits"] == "gathered"
    lines = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines].count("step") == 6 and [r["kind"] for r in lines].count("val") == 4
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(lines[1])
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert TrainingHistory.from_dict(history.to_dict()) == history


def test_non_finite_loss_stops_with_a_clear_error_and_returns_the_base_model() -> None:
    base = tiny_model("llama")
    with torch.no_grad():
        base.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 1 .*Lower lr"):
        train_offsets(base, tiny_tokenizer(), RECORDS, HEADS, **quiet(epochs=1))
    assert not any(isinstance(m, LofitProjection) for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())


def test_dpo_training_records_reward_metrics() -> None:
    model = train_offsets(
        tiny_model("opt"), tiny_tokenizer(), DPO_RECORDS, HEADS, "dpo", **quiet(epochs=1, batch_size=4)
    )
    step = model.training_history.steps[0]
    assert step["loss"] == pytest.approx(0.6931, abs=0.01)  # log 2: policy starts at the reference
    assert {"reward_margin", "reward_accuracy"} <= set(step)


def test_bf16_mixed_precision_keeps_adapter_in_fp32_and_fp32_works_afterwards() -> None:
    tok = tiny_tokenizer()
    model = train_offsets(tiny_model("llama"), tok, RECORDS, HEADS, **quiet(epochs=1, precision="bf16"))
    assert all(p.dtype == torch.float32 for p in model.adapter_parameters())
    assert all(torch.isfinite(torch.tensor(model.training_history.losses())))
    again = train_offsets(tiny_model("llama"), tok, RECORDS, HEADS, **quiet(epochs=1, precision="fp32"))
    assert again.training_history.settings["precision"] == "fp32"


def test_epoch_batches_cover_every_record_once_and_group_by_length() -> None:
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10]
    generator = torch.Generator().manual_seed(0)
    for group in (False, True):
        batches = epoch_batches(lengths, 3, generator, group)
        assert sorted(i for b in batches for i in b) == list(range(10))
        assert sorted(len(b) for b in batches) == [1, 3, 3, 3]
    grouped = epoch_batches(lengths, 3, torch.Generator().manual_seed(0), True)
    for batch in grouped:
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


def test_options_are_validated() -> None:
    with pytest.raises(TypeError, match=r"unknown training option\(s\) \['epoch'\]"):
        TrainingConfig.from_kwargs({"epoch": 3}, owner="train_offsets")
    for bad in ({"precision": "fp8"}, {"lr": 0.0}, {"epochs": 0}, {"warmup_ratio": 1.0}, {"batch_size": 2.5}):
        with pytest.raises(ValueError):
            TrainingConfig(**bad)  # type: ignore[arg-type]


def test_make_objective_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="objective must be one of"):
        make_objective("rlhf", tiny_tokenizer())


MULTI_PROCESS_SCRIPT = """
import os, sys, torch
from tiny_models import tiny_model, tiny_tokenizer
from lofit.training.offsets import train_offsets
records = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}" + "!" * (a * b)} for a in range(4) for b in range(3)]
model = train_offsets(tiny_model("llama"), tiny_tokenizer(), records, {0: [1], 2: [0, 3]}, progress=False,
                      epochs=2, batch_size=5, val_data=records[:3])
torch.save([p.detach().cpu() for p in model.adapter_parameters()], sys.argv[1] + f"_{os.environ.get('RANK', '0')}.pt")
"""


@pytest.mark.slow
def test_two_processes_give_the_single_process_result(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`torchrun --nproc_per_node 2` on CPU (gloo) trains exactly what one process trains."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "run.py"
    script.write_text(MULTI_PROCESS_SCRIPT)
    tests_dir = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": f"{tests_dir.parent / 'src'}:{tests_dir}",
        "ACCELERATE_USE_CPU": "true",
    }
    subprocess.run([sys.executable, str(script), str(tmp_path / "single")], env=env, check=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    subprocess.run([*launcher, str(script), str(tmp_path / "multi")], env=env, check=True, timeout=600)
    single = torch.load(tmp_path / "single_0.pt")
    for rank in (0, 1):
        multi = torch.load(tmp_path / f"multi_{rank}.pt")
        for a, b in zip(single, multi, strict=True):
            assert torch.allclose(a, b, atol=1e-7, rtol=0)
