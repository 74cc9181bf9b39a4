"""Running the model for evaluation: the causal LM behind a wrapper, its device, eval mode without
autograd, and forward calls that continue a KV cache (tokenisation lives in `tokens.py`)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM behind `model` (a `LofitModel` wraps one; its forward passes through).

    Args:
        model: a causal LM or a `LofitModel`.

    Returns:
        The causal LM module.
    """
    from ..adapters.model import LofitModel

    return model.get_base_model() if isinstance(model, LofitModel) else model


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where inputs go).

    Args:
        model: any module with parameters.

    Returns:
        Its device.
    """
    return next(model.parameters()).device


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the block; the model's training flag is restored after.

    Args:
        model: the model to run.

    Example:
        >>> from torch import nn
        >>> layer = nn.Linear(2, 2).train()
        >>> with inference(layer):
        ...     layer.training
        False
        >>> layer.training
        True
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def cache_kwarg(model: nn.Module) -> str:
    """The forward keyword for the KV cache: `cache` in recent transformers, `past_key_values` before.

    Args:
        model: a causal LM or a `LofitModel`.

    Returns:
        The keyword's name.
    """
    parameters = inspect.signature(type(causal_lm(model)).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def forward(
    model: nn.Module, input_ids: torch.Tensor, cache: Any = None, **extra: Any
) -> tuple[torch.Tensor, Any]:
    """Run `model` on `input_ids`, continuing `cache`.

    Args:
        model: a causal LM or a `LofitModel`.
        input_ids: token ids, [batch, length].
        cache: a KV cache from an earlier call, or None to start from scratch.
        **extra: more forward keywords (attention_mask, position_ids, ...).

    Returns:
        `(logits, the updated cache)`.
    """
    kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": True, **extra}
    if cache is not None:
        kwargs[cache_kwarg(model)] = cache
    output = model(**kwargs)
    new_cache = getattr(output, "cache", None)
    if new_cache is None:
        new_cache = getattr(output, "past_key_values", None)
    return output.logits, new_cache


def sliding_window(model: nn.Module) -> int | None:
    """The model's attention window if its config declares one.

    Args:
        model: a causal LM or a `LofitModel`.

    Returns:
        The window in tokens, or None for full attention everywhere.
    """
    config: Any = causal_lm(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text_config, "sliding_window", None)
    return window if isinstance(window, int) else None
