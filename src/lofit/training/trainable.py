"""What the training loop needs from a model: the typed `TrainableAdapter` protocol.

`train_adapter` trains any torch module that names its adapter's parameters and can switch its adapter
off: `LofitModel`, `RedModel` and, through `AdapterView`, a PEFT model or anything else with a
`disable_adapter()` context manager. The frozen base is reached with `causal_lm_of`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from torch import nn

from ..adapters.wrappers import PassThroughModel
from ..errors import LofitValueError


class NoAdapterSwitchError(LofitValueError, TypeError):
    """A module given to `AdapterView` has no way to switch its adapter off."""


@runtime_checkable
class TrainableAdapter(Protocol):
    """A torch module with an adapter: its parameters and a context that switches it off.

    `selected_heads()` ({layer: [head, ...]}) is read when present, to tie checkpoints to the heads.
    The DPO reference log-probs are always computed inside `disable_adapter()`.
    """

    training: bool

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter's parameters (the loop trains those with requires_grad)."""
        ...

    def disable_adapter(self) -> AbstractContextManager[Any]:
        """Inside the block the model computes exactly what its base model computes."""
        ...

    # What nn.Module provides and the loop uses:
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """All parameters, the frozen base's included."""
        ...

    def modules(self) -> Iterator[nn.Module]:
        """All submodules."""
        ...

    def train(self, mode: bool = True) -> Any:
        """Set training mode (the loop runs the model in eval mode and restores the mode)."""
        ...

    def eval(self) -> Any:
        """Set eval mode."""
        ...

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """Move to a device."""
        ...


class AdapterView(PassThroughModel):
    """Any adapted module seen through `TrainableAdapter`: its adapter parameters given explicitly.

    Args:
        model: a module that computes with its adapter (e.g. a PEFT model).
        parameters: the adapter's parameters (default: every parameter with requires_grad).
        disable_adapter: a function returning the context that switches the adapter off (default:
            `model.disable_adapter`).

    Example:
        >>> import torch
        >>> from contextlib import nullcontext
        >>> net = torch.nn.Linear(2, 2)
        >>> view = AdapterView(net, [net.bias], disable_adapter=nullcontext)
        >>> [tuple(p.shape) for p in view.adapter_parameters()], isinstance(view, TrainableAdapter)
        ([(2,)], True)
    """

    def __init__(
        self,
        model: nn.Module,
        parameters: Sequence[nn.Parameter] | None = None,
        disable_adapter: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        chosen = parameters if parameters is not None else [p for p in model.parameters() if p.requires_grad]
        self._adapter_parameters = list(chosen)
        switch = disable_adapter if disable_adapter is not None else getattr(model, "disable_adapter", None)
        if not callable(switch):
            raise NoAdapterSwitchError(
                f"{type(model).__name__} has no disable_adapter(); pass disable_adapter= (a function "
                "returning a context manager in which the model computes without its adapter)"
            )
        self._disable_adapter = switch

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The parameters given (or found) at construction."""
        return list(self._adapter_parameters)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """The wrapped model's own switch."""
        with self._disable_adapter():
            yield


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM that computes `model`'s logits (adapters stay in place inside it).

    Unwraps lofit's pass-through wrappers (`LofitModel`, `RedModel`, `AdapterView`) and PEFT models
    (`get_base_model()`); a plain causal LM is its own.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> causal_lm_of(AdapterView(net, [net.bias], disable_adapter=contextlib.nullcontext)) is net
        True
    """
    while True:
        if isinstance(model, PassThroughModel):
            model = model.model
            continue
        get_base_model = getattr(type(model), "get_base_model", None)
        if callable(get_base_model):
            inner = model.get_base_model()  # type: ignore[operator]
            if isinstance(inner, nn.Module) and inner is not model:
                model = inner
                continue
        return model
