"""The one thing a training loop needs from any baseline: the parameters to optimise."""

from __future__ import annotations

from torch import nn


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with requires_grad (each once, even if tied): the adapter's, for every builder here.

    Args:
        model: any module (a `LofitModel`, `RedModel`, PEFT model, ...).

    Returns:
        The trainable parameters, in `model.parameters()` order.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 2)
        >>> _ = layer.bias.requires_grad_(False)
        >>> [tuple(p.shape) for p in trainable_parameters(layer)]
        [(2, 2)]
    """
    return [param for param in model.parameters() if param.requires_grad]


def count_trainable_parameters(model: nn.Module) -> int:
    """The number of trainable values in `model` (see `trainable_parameters`).

    Example:
        >>> import torch
        >>> count_trainable_parameters(torch.nn.Linear(2, 3))
        9
    """
    return sum(param.numel() for param in trainable_parameters(model))
