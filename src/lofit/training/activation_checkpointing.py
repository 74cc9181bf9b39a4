"""Activation checkpointing of decoder layers that works with a frozen base model in eval mode.

transformers checkpoints its layers only in training mode, but LoFiT trains with the base in eval mode
(no dropout), so its switch would do nothing there. These wrappers checkpoint each decoder layer with
non-reentrant `torch.utils.checkpoint` whenever autograd records, in either mode. Non-reentrant
checkpointing needs no input that requires grad, so backward still stops at the lowest adapted layer
(transformers' own switch makes the embedding output require grad, which sends backward down to
layer 0).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_ORIGINAL = "_lofit_forward_before_checkpointing"


ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers: the first `nn.ModuleList` whose every element holds an attention module.

    Works on plain transformers models and on wrappers of them (LofitModel, PEFT models).
    """
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(map(_has_attention, module)):
            return list(module)
    raise ValueError(
        f"found no decoder layers in {type(model).__name__} (an nn.ModuleList of blocks with an attention "
        "module) to checkpoint; train without gradient_checkpointing"
    )


def _has_attention(block: nn.Module) -> bool:
    return any(name.rsplit(".", 1)[-1] in ATTENTION_NAMES for name, _ in block.named_modules())


def requested(model: nn.Module) -> bool:
    """Whether transformers' activation checkpointing is switched on anywhere in `model`."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable(layers: list[nn.Module]) -> list[nn.Module]:
    """Checkpoint every layer in `layers`; return those that were not checkpointed already."""
    switched = []
    for layer in layers:
        if _ORIGINAL in layer.__dict__:
            continue
        switched.append(layer)
        own = layer.__dict__.get("forward")  # accelerate's device hooks replace forward per instance
        layer.__dict__[_ORIGINAL] = own
        layer.forward = functools.partial(_checkpointed, own if own is not None else layer.forward)
    return switched


def disable(layers: list[nn.Module]) -> None:
    """Undo `enable`, restoring each layer's own forward."""
    for layer in layers:
        if _ORIGINAL not in layer.__dict__:
            continue
        own = layer.__dict__.pop(_ORIGINAL)
        if own is None:
            del layer.forward
        else:
            layer.forward = own


@contextlib.contextmanager
def checkpointing(layers: list[nn.Module], on: bool = True) -> Iterator[None]:
    """Checkpoint `layers` inside the block (if `on`), leaving them as they were afterwards."""
    switched = enable(layers) if on else []
    try:
        yield
    finally:
        disable(switched)
