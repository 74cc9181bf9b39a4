"""The one thing a training loop needs from any baseline: the parameters to optimise."""

from __future__ import annotations

from torch import nn


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with requires_grad (each once, even if tied): the adapter's, for every builder here."""
    return [param for param in model.parameters() if param.requires_grad]


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(param.numel() for param in trainable_parameters(model))
