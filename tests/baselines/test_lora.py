"""LoRA through peft (parameter counts by hand, identity at init, training) and the shared protocol."""

from __future__ import annotations

import pytest
import torch

from lofit.baselines import (
    apply_iti,
    count_trainable_parameters,
    get_lora_model,
    get_red_model,
    lora_target_modules,
    trainable_parameters,
)
from tiny_models import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

IDS = torch.tensor([[5, 17, 33, 40, 2, 90, 61, 7], [12, 3, 3, 100, 45, 9, 27, 88]])
R, HIDDEN, LAYERS = 8, 32, 3


# A LoRA pair on an in -> out projection holds A [r, in] and B [out, r]: r * (in + out) numbers.
def _lora(in_features: int, out_features: int) -> int:
    return R * (in_features + out_features)


@pytest.mark.parametrize(
    ("model_type", "per_layer"),
    [
        # 4 query heads of 8 -> q_proj 32 -> 32; 2 key/value heads of 8 -> v_proj 32 -> 16
        ("llama", _lora(HIDDEN, 32) + _lora(HIDDEN, 16)),
        ("mistral", _lora(HIDDEN, 32) + _lora(HIDDEN, 16)),
        # qwen3: head_dim 12 -> q_proj 32 -> 48, v_proj 32 -> 24
        ("qwen3", _lora(HIDDEN, 48) + _lora(HIDDEN, 24)),
        ("opt", _lora(HIDDEN, 32) + _lora(HIDDEN, 32)),
        # fused q, k, v: 32 -> 96
        ("gpt2", _lora(HIDDEN, 96)),
        ("gpt_neox", _lora(HIDDEN, 96)),
        # phi3 fused qkv_proj: q 32 + k 16 + v 16 = 64
        ("phi3", _lora(HIDDEN, 64)),
    ],
)
def test_parameter_counts_by_hand(model_type: str, per_layer: int) -> None:
    model = get_lora_model(tiny_model(model_type))
    assert count_trainable_parameters(model) == LAYERS * per_layer
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 8, 0.1)


def test_default_targets() -> None:
    assert lora_target_modules(tiny_model("llama")) == ["q_proj", "v_proj"]
    assert lora_target_modules(tiny_model("gpt2")) == ["c_attn"]
    assert lora_target_modules(tiny_model("gpt_neox")) == ["query_key_value"]
    assert lora_target_modules(tiny_model("opt")) == ["q_proj", "v_proj"]
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="pass target_modules"):
        get_lora_model(model)
    with pytest.raises(ValueError, match="no module of this model matches"):
        get_lora_model(tiny_model("llama"), target_modules=["nope_proj"])


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_identity_at_init(model_type: str) -> None:
    with torch.no_grad():
        base = tiny_model(model_type)(input_ids=IDS).logits
        model = get_lora_model(tiny_model(model_type))
        model.eval()
        assert torch.equal(model(input_ids=IDS).logits, base)  # B = 0 at init


def _sgd_steps(
    model: torch.nn.Module, params: list[torch.nn.Parameter], steps: int, lr: float
) -> tuple[float, float]:
    """The generic loop a trainer runs for any baseline: eval loss before, `steps` SGD steps, eval loss after."""
    optimizer = torch.optim.SGD(params, lr=lr)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(input_ids=IDS, labels=IDS).loss)

    before = eval_loss()
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
    return before, eval_loss()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_lora_trains_with_the_generic_loop(model_type: str) -> None:
    model = get_lora_model(tiny_model(model_type))
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    before, after = _sgd_steps(model, trainable_parameters(model), steps=3, lr=0.5)
    assert after < before - 1e-3
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if not p.requires_grad)


def test_red_trains_with_the_generic_loop() -> None:
    model = get_red_model(tiny_model("llama"))
    before, after = _sgd_steps(model, trainable_parameters(model), steps=3, lr=0.5)
    assert after < before - 1e-3


def test_protocol_across_baselines() -> None:
    iti = apply_iti(tiny_model("llama"), {(0, 1): torch.ones(8)})
    red = get_red_model(tiny_model("llama"))
    lora = get_lora_model(tiny_model("llama"))
    assert trainable_parameters(iti) == []
    assert count_trainable_parameters(red) == 2 * HIDDEN * LAYERS
    assert count_trainable_parameters(lora) == LAYERS * (_lora(HIDDEN, 32) + _lora(HIDDEN, 16))
    for model in (iti, red, lora):  # each has the DPO reference switch
        with model.disable_adapter():
            pass
