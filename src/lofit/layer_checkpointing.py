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

from .heads import HeadGeometry

_ORIGINAL = "_lofit_forward_before_checkpointing"


def decoder_layers(model: nn.Module, geometry: HeadGeometry) -> list[nn.Module]:
    """The decoder layer (the `nn.ModuleList` element) that holds each attention output projection."""
    layers: list[nn.Module] = []
    for site in geometry.sites:
        parts = site.name.split(".")
        for end in range(len(parts) - 1, 0, -1):
            parent = model.get_submodule(".".join(parts[: end - 1]))
            if isinstance(parent, nn.ModuleList):
                layers.append(model.get_submodule(".".join(parts[:end])))
                break
        else:
            raise ValueError(f"{site.name} lies in no nn.ModuleList of decoder layers; cannot checkpoint it")
    return layers


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


def is_enabled(layers: list[nn.Module]) -> bool:
    return bool(layers) and all(_ORIGINAL in layer.__dict__ for layer in layers)


@contextlib.contextmanager
def checkpointing(layers: list[nn.Module], on: bool = True) -> Iterator[None]:
    """Checkpoint `layers` inside the block (if `on`), leaving them as they were afterwards."""
    switched = enable(layers) if on else []
    try:
        yield
    finally:
        disable(switched)
