"""Compatibility names: activation checkpointing lives in `lofit.training.activation_checkpointing`."""

from __future__ import annotations

from .training.activation_checkpointing import (
    ATTENTION_NAMES,
    checkpointing,
    decoder_layers,
    disable,
    enable,
    requested,
)

__all__ = ["ATTENTION_NAMES", "checkpointing", "decoder_layers", "disable", "enable", "requested"]
