"""The paper's baselines in lofit's harness: ITI, RED, LoRA, RepE and LoReFT.

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
from .loreft import LoreftIntervention, LoreftModel, get_loreft_model
from .parameters import count_trainable_parameters, trainable_parameters
from .red import RedConfig, RedModel, RedProjection, get_red_model
from .repe import RepeModel, RepeShift, apply_repe, contrast_vector, reading_vector, residual_at_last_token

__all__ = [
    "ItiDirections",
    "LoreftIntervention",
    "LoreftModel",
    "RedConfig",
    "RedModel",
    "RedProjection",
    "RepeModel",
    "RepeShift",
    "apply_iti",
    "apply_repe",
    "contrast_vector",
    "count_trainable_parameters",
    "get_lora_model",
    "get_loreft_model",
    "get_red_model",
    "head_activations_at_last_token",
    "iti_offsets",
    "iti_records",
    "lora_target_modules",
    "mass_mean_directions",
    "reading_vector",
    "residual_at_last_token",
    "trainable_parameters",
]
