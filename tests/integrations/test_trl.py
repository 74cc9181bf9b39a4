"""TRL's SFTTrainer and DPOTrainer with a LofitModel: what trains, the DPO reference, what is saved."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import torch
from datasets import Dataset

import lofit
from tiny_models import tiny_model, tiny_tokenizer

trl = pytest.importorskip("trl", reason="TRL is an optional extra: pip install lofit[trl]")
from lofit.errors import LofitError  # noqa: E402
from lofit.integrations import LofitDPOTrainer, LofitSFTTrainer, adapter_disabled_reference  # noqa: E402

HEADS = {1: [0, 2], 2: [3]}
SFT = [{"prompt": f"{a} plus {a} is", "completion": f" {2 * a}."} for a in range(8)]
DPO = [{"prompt": f"{a} plus {a} is", "chosen": f" {2 * a}.", "rejected": f" {2 * a + 1}."} for a in range(8)]


def lofit_model():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return lofit.get_lofit_model(tiny_model("llama", 0), lofit.LofitConfig(heads=HEADS, init_std=1e-3))


def wrapped(model):  # type: ignore[no-untyped-def]
    return model.get_base_model() if "get_base_model" in dir(type(model)) else model.base_model


def decoder_layout(model) -> bool:  # type: ignore[no-untyped-def]
    """TRL's fused LM head runs `model.base_model` as the decoder stack (helper A's PEFT-like layout)."""
    return model.base_model is not wrapped(model)


needs_decoder_layout = pytest.mark.xfail(
    not decoder_layout(lofit_model()),
    reason="TRL reads LofitModel.base_model as the decoder stack; this branch predates that layout",
    strict=True,
)


def config(kind: str, out: Path, **overrides):  # type: ignore[no-untyped-def]
    options = dict(
        output_dir=str(out), max_steps=6, save_steps=3, learning_rate=2e-2, per_device_train_batch_size=4,
        bf16=False, use_cpu=True, report_to=[], disable_tqdm=True, seed=1, logging_steps=1,
    )  # fmt: skip
    return getattr(trl, f"{kind}Config")(**{**options, **overrides})


def base_weights(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {
        k: v.detach().clone() for k, v in wrapped(model).state_dict().items() if "lofit_adapters" not in k
    }


def completion_loss(model) -> float:  # type: ignore[no-untyped-def]
    """Mean NLL of the SFT completions given their prompts (independent of TRL's collator)."""
    tokenizer, total = tiny_tokenizer(), 0.0
    for record in SFT:
        prompt = tokenizer(record["prompt"])["input_ids"]
        ids = prompt + tokenizer(record["completion"])["input_ids"]
        labels = [-100] * len(prompt) + ids[len(prompt) :]
        with torch.no_grad():
            total += float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss)
    return total / len(SFT)


def assert_only_adapter_changed(model, before_base, before_adapter) -> None:  # type: ignore[no-untyped-def]
    after = base_weights(model)
    assert after.keys() == before_base.keys()
    assert all(torch.equal(before_base[k], after[k]) for k in after)  # bit-identical base
    now = model.get_head_params()
    assert all(not torch.equal(before_adapter[h]["offset"], now[h]["offset"]) for h in now)


@needs_decoder_layout
def test_sft_trainer_trains_only_the_adapter_and_checkpoints_it(tmp_path):
    model = lofit_model()
    before_base, before_adapter, loss_before = (
        base_weights(model),
        model.get_head_params(),
        completion_loss(model),
    )
    trainer = LofitSFTTrainer(
        model=model, args=config("SFT", tmp_path), train_dataset=Dataset.from_list(SFT),
        processing_class=tiny_tokenizer(),
    )  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 6
    assert completion_loss(model) < loss_before
    assert_only_adapter_changed(model, before_base, before_adapter)
    saved = {p.name for p in (tmp_path / "checkpoint-6").iterdir()}
    assert {"lofit_config.json", "lofit_model.safetensors", "tokenizer.json"} <= saved
    assert "model.safetensors" not in saved
    reloaded = lofit.LofitModel.from_pretrained(tiny_model("llama", 0), tmp_path / "checkpoint-6")
    assert completion_loss(reloaded) == completion_loss(model)


@needs_decoder_layout
def test_plain_sft_trainer_trains_a_lofit_model(tmp_path):
    model = lofit_model()
    before_base, before_adapter, loss_before = (
        base_weights(model),
        model.get_head_params(),
        completion_loss(model),
    )
    trainer = trl.SFTTrainer(
        model=model, args=config("SFT", tmp_path, save_strategy="no"), train_dataset=Dataset.from_list(SFT),
        processing_class=tiny_tokenizer(),
    )  # fmt: skip
    trainer.train()
    assert completion_loss(model) < loss_before
    assert_only_adapter_changed(model, before_base, before_adapter)


@needs_decoder_layout
def test_dpo_trainer_uses_the_base_as_reference_and_downloads_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = lofit_model()
    before_base, before_adapter = base_weights(model), model.get_head_params()
    trainer = LofitDPOTrainer(
        model=model, args=config("DPO", tmp_path), train_dataset=Dataset.from_list(DPO),
        processing_class=tiny_tokenizer(),
    )  # fmt: skip  # no ref_model: the base with the adapter disabled
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(
            trainer.ref_model(input_ids=ids).logits, tiny_model("llama", 0)(input_ids=ids).logits
        )
    assert sum(p.numel() for p in trainer.ref_model.parameters()) == 0
    margin_before = dpo_margin(model)
    result = trainer.train()
    history = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert result.global_step == 6 and len(history) == 6
    assert abs(history[0] - 0.6931) < 0.01  # policy ~ reference at the start: -log sigmoid(0)
    assert history[-1] < history[0] and dpo_margin(model) > margin_before
    assert_only_adapter_changed(model, before_base, before_adapter)
    with torch.no_grad():  # the reference is still the base after training
        assert torch.equal(
            trainer.ref_model(input_ids=ids).logits, tiny_model("llama", 0)(input_ids=ids).logits
        )
    saved = {p.name for p in (tmp_path / "checkpoint-6").iterdir()}
    assert {"lofit_config.json", "lofit_model.safetensors"} <= saved and "model.safetensors" not in saved


def dpo_margin(model) -> float:  # type: ignore[no-untyped-def]
    """Mean log p(chosen) - log p(rejected) of the completions (independent of TRL)."""
    tokenizer, total = tiny_tokenizer(), 0.0
    for record in DPO:
        prompt = tokenizer(record["prompt"])["input_ids"]
        scores = []
        for key in ("chosen", "rejected"):
            ids = prompt + tokenizer(record[key])["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            picked = logits[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
            scores.append(float(picked[len(prompt) - 1 :].sum()))
        total += scores[0] - scores[1]
    return total / len(DPO)


@needs_decoder_layout
def test_plain_dpo_trainer_with_the_adapter_disabled_reference_raises_the_margin(tmp_path):
    model = lofit_model()
    margin_before = dpo_margin(model)
    trainer = trl.DPOTrainer(
        model=model, ref_model=adapter_disabled_reference(model), args=config("DPO", tmp_path, save_strategy="no"),
        train_dataset=Dataset.from_list(DPO), processing_class=tiny_tokenizer(),
    )  # fmt: skip
    trainer.train()
    assert dpo_margin(model) > margin_before


def test_dpo_sync_ref_model_is_refused_clearly(tmp_path):
    with pytest.raises(LofitError, match="sync_ref_model=False"):
        LofitDPOTrainer(
            model=lofit_model(), args=config("DPO", tmp_path, sync_ref_model=True),
            train_dataset=Dataset.from_list(DPO), processing_class=tiny_tokenizer(),
        )  # fmt: skip


def test_reference_doctest_runs():
    import lofit.integrations.trl as module

    failures, tried = doctest.testmod(module)
    assert tried > 0 and failures == 0
