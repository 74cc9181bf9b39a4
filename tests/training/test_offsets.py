"""Offset tuning: only the selected heads change, the base is untouched, and the objectives improve."""

from __future__ import annotations

import pytest
import torch

from lofit import LofitModel
from lofit.adapters.config import LofitConfigError
from lofit.adapters.layer import LofitProjection
from lofit.selection.ranking import HeadSelection, rank_heads
from lofit.selection.select import select_heads
from lofit.training.logprobs import TokenScorer, sequence_logps
from lofit.training.losses import make_objective
from lofit.training.offsets import train_offsets
from tiny_models import ARCHITECTURES, tiny_model, tiny_tokenizer

RECORDS = [{"prompt": f"Q: {a} {b} A:", "completion": f" {a}{b}{a}"} for a in range(4) for b in range(4)]
DPO_RECORDS = [{"prompt": f"{a}?", "chosen": f" {a}!", "rejected": f" {a + 1}?"} for a in range(8)]
HEADS = {0: [3], 1: [0, 2]}


def quiet(**kwargs):  # type: ignore[no-untyped-def]
    return {"progress": False, **kwargs}


def base_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Base weights by their original names (the wrapper adds '.base_layer')."""
    return {
        name.replace(".base_layer", ""): tensor.cpu().clone()
        for name, tensor in model.state_dict().items()
        if "lofit_adapters" not in name
    }


def test_only_the_selected_heads_get_offsets_and_the_base_is_untouched() -> None:
    base = tiny_model("llama")
    before = base_tensors(base)
    model = train_offsets(base, tiny_tokenizer(), RECORDS, HEADS, **quiet(epochs=2, init_std=0.0))
    assert isinstance(model, LofitModel)
    assert model.selected_heads() == HEADS
    params = model.get_head_params()
    assert set(params) == {(0, 3), (1, 0), (1, 2)}
    assert all(entry["offset"].abs().min() > 0 for entry in params.values())  # all moved away from 0
    assert all(torch.equal(entry["scale"].cpu(), torch.zeros(8)) for entry in params.values())
    after = base_tensors(model.get_base_model())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if "lofit_adapters" in n}
    assert model.count_parameters()[0] == 3 * 8
    assert model.training_history.settings["lr"] == 1e-2


def completion_nll(model: torch.nn.Module, records: list[dict]) -> float:
    objective = make_objective("sft", tiny_tokenizer())
    batch = objective.batch(objective.encode(records)).to(next(model.parameters()).device)
    with torch.no_grad():
        return -float(TokenScorer(model, "full")(batch).mean())


def test_sft_lowers_the_completion_nll_on_the_training_records() -> None:
    base = tiny_model("qwen2")
    with torch.no_grad():  # random tiny models have near-uniform logits; a larger LM head lets offsets matter
        base.get_output_embeddings().weight.mul_(20)
    before = completion_nll(base, RECORDS)
    model = train_offsets(base, tiny_tokenizer(), RECORDS, HEADS, **quiet(epochs=5, batch_size=4, lr=5e-2))
    after = completion_nll(model, RECORDS)
    assert after < 0.7 * before
    with model.disable_adapter():
        assert completion_nll(model, RECORDS) == pytest.approx(before, rel=1e-6)


def dpo_margin(model: torch.nn.Module) -> float:
    objective = make_objective("dpo", tiny_tokenizer())
    batch = objective.batch(objective.encode(DPO_RECORDS)).to(next(model.parameters()).device)
    with torch.no_grad():
        logps = sequence_logps(TokenScorer(model, "full")(batch), batch).view(-1, 2)
    return float((logps[:, 0] - logps[:, 1]).mean())


def test_dpo_raises_the_chosen_minus_rejected_margin() -> None:
    base = tiny_model("llama")
    with torch.no_grad():
        base.get_output_embeddings().weight.mul_(20)
    before = dpo_margin(base)
    model = train_offsets(
        base, tiny_tokenizer(), DPO_RECORDS, HEADS, "dpo", **quiet(epochs=5, batch_size=4, lr=5e-2)
    )
    assert dpo_margin(model) > before + 4.0
    assert model.training_history.steps[-1]["reward_accuracy"] == 1.0
    assert model.training_history.losses()[-1] < 0.3


def test_bad_arguments_fail_clearly_and_hand_the_base_back() -> None:
    tok = tiny_tokenizer()
    scores = torch.rand(3, 4)
    selection = HeadSelection(scores, rank_heads(scores), "random")
    with pytest.raises(TypeError, match=r"selection.top\(k\)"):
        train_offsets(tiny_model("llama"), tok, RECORDS, selection)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="select_heads"):
        train_offsets(tiny_model("llama"), tok, RECORDS, HEADS, l1=1e-3)
    base = tiny_model("llama")
    with pytest.raises(LofitConfigError, match="out of range"):
        train_offsets(base, tok, RECORDS, {5: [0]})
    assert not any(isinstance(m, LofitProjection) for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_select_then_train_on_every_architecture(arch: str) -> None:
    base = tiny_model(arch)
    tok = tiny_tokenizer()
    selection = select_heads(base, tok, RECORDS[:8], **quiet(epochs=1, batch_size=4))
    model = train_offsets(base, tok, RECORDS[:8], selection.top(0.25), **quiet(epochs=1, batch_size=4))
    assert model.selected_heads() == selection.top(3)
    assert model.training_history.summary["logits"] == "gathered"
    assert all(torch.isfinite(torch.tensor(model.training_history.losses())))
