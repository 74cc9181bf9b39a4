"""Activation checkpointing in the trainer: same result, layers recomputed only from the lowest adapted one."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from torch import nn

from lofit import LofitConfig, get_lofit_model
from lofit.training.activation_checkpointing import checkpointing, decoder_layers, requested
from lofit.training.loop import train_adapter
from lofit.training.losses import make_objective
from lofit.training.offsets import train_offsets
from lofit.training.settings import TrainingConfig
from tiny_models import tiny_model, tiny_tokenizer

RECORDS = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(4) for b in range(2)]
HEADS = {1: [0], 2: [1, 3]}  # lowest adapted layer: 1 of 0..2
ATTENTION = re.compile(r"(?:layers|h)\.(\d+)\.(?:self_attn|attn)$")


def count_attention_calls(model: nn.Module) -> Counter[int]:
    """Count calls of each layer's attention module (a recomputed layer calls it again in backward)."""
    calls: Counter[int] = Counter()
    for name, module in model.named_modules():
        match = ATTENTION.search(name)
        if match:
            layer = int(match.group(1))
            module.register_forward_pre_hook(lambda *_, layer=layer: calls.update([layer]))
    return calls


def train(arch: str, **options: object) -> tuple[list[torch.Tensor], Counter[int], dict]:  # type: ignore[type-arg]
    base = tiny_model(arch)
    calls = count_attention_calls(base)
    model = train_offsets(
        base, tiny_tokenizer(), RECORDS, HEADS, progress=False, epochs=2, batch_size=4, **options
    )
    vectors = [p.detach().clone() for p in model.adapter_parameters()]
    return vectors, calls, model.training_history.settings


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpointed_training_gives_the_same_offsets_and_recomputes_only_adapted_layers(arch: str) -> None:
    plain, plain_calls, plain_settings = train(arch)
    checkpointed, calls, settings = train(arch, gradient_checkpointing=True)
    assert plain_settings["gradient_checkpointing"] is False and settings["gradient_checkpointing"] is True
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    steps = settings["total_steps"]
    # Without checkpointing each layer runs once per forward; with it, every layer from the lowest adapted
    # one is run again in each step's backward, and layer 0 (below it: no backward at all) is not.
    assert len(set(plain_calls.values())) == 1
    assert calls[0] == plain_calls[0]
    assert calls[1] == calls[2] == plain_calls[1] + steps


def test_the_models_own_switch_is_honoured_in_eval_mode_training() -> None:
    base = tiny_model("llama")
    model = get_lofit_model(base, LofitConfig(heads=HEADS, use_scale=False, init_std=0.0))
    model.gradient_checkpointing_enable()
    assert requested(model)
    calls = count_attention_calls(base)
    objective = make_objective("sft", tiny_tokenizer())
    config = TrainingConfig(epochs=1, batch_size=8, progress=False)
    history = train_adapter(model, objective, objective.encode(RECORDS), config)
    assert history.settings["gradient_checkpointing"] is True
    assert calls[1] == calls[2] == calls[0] + 1  # one step: layers 1 and 2 recomputed once
    layers = decoder_layers(model)
    assert not any("forward" in layer.__dict__ for layer in layers)  # wrappers removed after training


def test_context_restores_layers_and_skips_under_no_grad() -> None:
    base = tiny_model("llama")
    model = get_lofit_model(base, LofitConfig(heads=HEADS, use_scale=False, init_std=0.1)).eval()
    layers = decoder_layers(model)
    assert layers == list(base.model.layers)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with checkpointing(layers):
        assert all("forward" in layer.__dict__ for layer in layers)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=0, rtol=0)
    assert not any("forward" in layer.__dict__ for layer in layers)
