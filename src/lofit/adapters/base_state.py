"""The base model as the user handed it in: refuse adapted models, and give the base back as it came."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LofitValueError
from .layer import LofitProjection
from .model import LofitModel, check_base_model


class AdaptedBaseModelError(LofitValueError, TypeError):
    """A function that needs the plain base model got one carrying LoFiT adapters."""


def check_plain_model(model: nn.Module, owner: str) -> None:
    """Refuse a model that carries LoFiT adapters (an `AdaptedBaseModelError`, a TypeError).

    Args:
        model: the model handed to `owner`.
        owner: the public function's name, for the message.
    """
    check_base_model(model, f"{owner}()")
    if isinstance(model, LofitModel) or any(isinstance(m, LofitProjection) for m in model.modules()):
        raise AdaptedBaseModelError(
            f"{owner}() needs the plain base model, but this one carries LoFiT adapters; pass the model "
            "from LofitModel.unload() (or merge_and_unload()) instead"
        )


@dataclass
class BaseModelState:
    """requires_grad flags, train/eval mode and device of a model, to hand it back as it came.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> state = BaseModelState.capture(net)
        >>> _ = net.requires_grad_(False).eval()
        >>> state.restore(net)
        >>> net.weight.requires_grad, net.training
        (True, True)
    """

    flags: dict[str, bool]  # by name: a parameter object may be replaced meanwhile (FSDP gathers new ones)
    training: bool
    devices: set[torch.device]

    @classmethod
    def capture(cls, model: nn.Module) -> BaseModelState:
        """Record `model`'s flags, mode and devices."""
        named = dict(model.named_parameters(remove_duplicate=False))
        flags = {name: p.requires_grad for name, p in named.items()}
        return cls(flags, model.training, {p.device for p in named.values()})

    def restore(self, model: nn.Module) -> None:
        """Put the recorded flags and mode back (and the device, when the model was on one)."""
        for name, param in model.named_parameters(remove_duplicate=False):
            if name in self.flags:
                param.requires_grad_(self.flags[name])
        model.train(self.training)
        if len(self.devices) == 1:
            device = next(iter(self.devices))
            if next(model.parameters()).device != device:
                model.to(device)


@contextlib.contextmanager
def preserved_base_model(model: nn.Module) -> Iterator[None]:
    """Restore requires_grad flags, train/eval mode and device of `model` when the block ends."""
    state = BaseModelState.capture(model)
    try:
        yield
    finally:
        state.restore(model)
