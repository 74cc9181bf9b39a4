"""LoRA baseline through `peft`: r = 8, α = 8, dropout 0.1 on the query and value projections.

Architectures with a fused query/key/value projection (GPT-2 `c_attn`, GPT-NeoX and Falcon/Bloom
`query_key_value`, Phi-3 `qkv_proj`) cannot adapt q and v alone; LoRA then adapts the fused
projection, i.e. keys too (peft's own default for these models).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..adapters.architectures import LORA_TARGET_MODULES
from ..adapters.heads import text_config


def lora_target_modules(model: nn.Module) -> list[str]:
    """The query/value projection names LoRA adapts for this model's architecture."""
    model_type = str(getattr(text_config(getattr(model, "config", None)), "model_type", "unknown"))
    targets = LORA_TARGET_MODULES.get(model_type)
    if targets is None:
        raise ValueError(
            f"model_type {model_type!r} has no known query/value projections for LoRA; pass "
            "target_modules=[...] naming them (e.g. ['q_proj', 'v_proj'])"
        )
    return list(targets)


def get_lora_model(
    base_model: nn.Module,
    r: int = 8,
    alpha: int = 8,
    dropout: float = 0.1,
    target_modules: list[str] | None = None,
) -> Any:
    """`peft` LoRA on `base_model` (changed in place); only the lora_ weights are trainable.

    Returns a `peft.PeftModelForCausalLM`; `trainable_parameters(model)` lists what to optimise.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError(
            "the LoRA baseline needs the `peft` package; install it with `pip install peft`"
        ) from None
    if r < 1:
        raise ValueError(f"r must be a positive integer, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    targets = lora_target_modules(base_model) if target_modules is None else list(target_modules)
    adapted = [
        module
        for name, module in base_model.named_modules()
        if any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not adapted:
        raise ValueError(f"no module of this model matches target_modules={targets}; pass names that exist")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        # GPT-2's Conv1D stores W transposed; peft needs to be told (it would warn and fix it itself).
        fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in adapted),
    )
    return get_peft_model(base_model, config)
