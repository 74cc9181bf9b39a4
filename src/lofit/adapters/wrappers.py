"""Two small building blocks shared by LoFiT's and the baselines' adapters."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

_Self = TypeVar("_Self", bound="Fp32Parameters")


class PassThroughModel(nn.Module):
    """A wrapper of `self.model` whose `forward`, `generate` and every other attribute pass through.

    Example:
        >>> import torch
        >>> class Wrapper(PassThroughModel):
        ...     def __init__(self, model: nn.Module) -> None:
        ...         super().__init__()
        ...         self.model = model
        >>> Wrapper(torch.nn.Linear(2, 3)).out_features
        3
    """

    model: nn.Module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)  # type: ignore[operator]


class SwitchableModel(PassThroughModel):
    """A pass-through wrapper whose edit is skipped while `disabled` is set (hook-based baselines).

    Example:
        >>> import torch
        >>> class Shift(SwitchableModel):
        ...     def __init__(self, model: nn.Module) -> None:
        ...         super().__init__()
        ...         self.model, self.disabled = model, False
        >>> wrapped = Shift(torch.nn.Identity())
        >>> with wrapped.disable_adapter():
        ...     wrapped.disabled
        True
        >>> wrapped.disabled
        False
    """

    disabled: bool

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model behaves exactly like the base model."""
        previous, self.disabled = self.disabled, True
        try:
            yield
        finally:
            self.disabled = previous


class Fp32Parameters(nn.Module):
    """A module whose own parameters stay fp32 when the model is cast (`model.half()`, `.to(bf16)`).

    Its submodules are cast as usual; the exact fp32 values of its own parameters are restored, moved to
    wherever the cast sent them.
    """

    def _apply(self: _Self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> _Self:
        stash = {name: p.data for name, p in self.named_parameters(recurse=False)}
        super()._apply(fn, recurse)
        for name, param in self.named_parameters(recurse=False):
            if param.dtype != torch.float32 and param.dtype.is_floating_point:
                param.data = stash[name].to(device=param.device, dtype=torch.float32)
        return self
