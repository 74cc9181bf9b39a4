"""The paper's baselines in lofit's harness: ITI, RED and LoRA.

Every builder returns a model whose trainable parameters are exactly the baseline's own (none for ITI),
so one training loop serves all: optimise `trainable_parameters(model)`, use `model.disable_adapter()`
for the DPO reference model.
"""

from __future__ import annotations

from .iti import (
    ItiDirections,
    apply_iti,
    head_activations_at_last_token,
    iti_offsets,
    iti_records,
    mass_mean_directions,
)
from .lora import get_lora_model, lora_target_modules
from .parameters import count_trainable_parameters, trainable_parameters
from .red import RedConfig, RedModel, RedProjection, get_red_model

__all__ = [
    "ItiDirections",
    "RedConfig",
    "RedModel",
    "RedProjection",
    "apply_iti",
    "count_trainable_parameters",
    "get_lora_model",
    "get_red_model",
    "head_activations_at_last_token",
    "iti_offsets",
    "iti_records",
    "lora_target_modules",
    "mass_mean_directions",
    "trainable_parameters",
]
