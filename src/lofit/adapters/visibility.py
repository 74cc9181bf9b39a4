"""What a `LofitModel` shows to tools that introspect models (transformers' Trainer, TRL, accelerate).

Two things, both installed when a LofitModel is built:

- **The forward signature.** Trainer keeps only the dataset columns named in `inspect.signature(model.forward)`
  and finds label columns from the class's `forward`; a pass-through `forward(*args, **kwargs)` hides every
  argument ("No columns in the dataset match the model's forward method signature"). The instance gets a
  bound `forward` whose signature is the wrapped model's own; the class-level `forward` declares the usual
  causal-LM arguments (`CAUSAL_LM_SIGNATURE`), so `labels` is found as Trainer's label name.
- **A guard on the wrapped model's `save_pretrained`.** While its projections are wrapped, the wrapped
  transformers model's state dict names the projection weight `...o_proj.base_layer.weight`; a plain
  `save_pretrained` (which `Trainer(model=lofit_model.get_base_model())` calls) would write a checkpoint
  that transformers loads with a random `o_proj.weight`. The guard refuses with a `LofitRuntimeError`
  that says what to save instead; once the adapters are unloaded or merged away it calls the real method.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import LofitRuntimeError

_P = inspect.Parameter
CAUSAL_LM_SIGNATURE = inspect.Signature(
    [
        _P("self", _P.POSITIONAL_OR_KEYWORD),
        _P("input_ids", _P.POSITIONAL_OR_KEYWORD, default=None),
        _P("attention_mask", _P.POSITIONAL_OR_KEYWORD, default=None),
        _P("labels", _P.KEYWORD_ONLY, default=None),
        _P("kwargs", _P.VAR_KEYWORD),
    ]
)
"""The class-level signature of `LofitModel.forward` (the instance shows the wrapped model's own)."""


def expose_forward_signature(model: nn.Module, inner: nn.Module) -> None:
    """Give `model.forward` (an instance attribute) the signature of `inner.forward`.

    The bound method calls the class's `forward`, so behaviour is unchanged; deep copies rebind it to the
    copy, and accelerate's mixed-precision wrapping (which reads `forward.__func__`) keeps working.

    Args:
        model: the wrapper (a `LofitModel`).
        inner: the wrapped transformers model whose arguments `model.forward` accepts.

    Example:
        >>> import inspect, torch
        >>> class Wrapper(torch.nn.Module):
        ...     def __init__(self, inner):
        ...         super().__init__()
        ...         self.inner = inner
        ...     def forward(self, *args, **kwargs):
        ...         return self.inner(*args, **kwargs)
        >>> wrapper = Wrapper(torch.nn.Linear(2, 2))
        >>> expose_forward_signature(wrapper, wrapper.inner)
        >>> str(inspect.signature(wrapper.forward))
        '(input: torch.Tensor) -> torch.Tensor'
        >>> wrapper(torch.zeros(1, 2)).shape
        torch.Size([1, 2])
    """
    class_forward = type(model).forward
    shown = inspect.signature(inner.forward)
    self_parameter = _P("self", _P.POSITIONAL_OR_KEYWORD)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return class_forward(self, *args, **kwargs)

    forward.__signature__ = shown.replace(parameters=[self_parameter, *shown.parameters.values()])  # type: ignore[attr-defined]
    forward.__doc__ = class_forward.__doc__
    forward.__name__ = "forward"
    setattr(model, "forward", types.MethodType(forward, model))  # noqa: B010 (an instance attribute)


def guard_wrapped_save(inner: nn.Module, is_adapter_layer: Callable[[nn.Module], bool]) -> None:
    """Make `inner.save_pretrained` refuse while any of its modules is an adapter layer.

    Args:
        inner: the wrapped transformers model.
        is_adapter_layer: tells whether a module is a lofit wrapper of a projection.
    """
    real_save = getattr(type(inner), "save_pretrained", None)
    if real_save is None or "save_pretrained" in vars(inner):
        return

    def save_pretrained(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        wrapped = [name for name, module in self.named_modules() if is_adapter_layer(module)]
        if wrapped:
            raise LofitRuntimeError(
                f"this model carries LoFiT adapters ({wrapped[0]} and {len(wrapped) - 1} more are wrapped), "
                "so its save_pretrained would write a checkpoint that transformers loads with random "
                "projection weights. Save the adapter with lofit_model.save_pretrained(dir), or a plain "
                "checkpoint with lofit_model.merge_and_unload().save_pretrained(dir); to train it with "
                "transformers.Trainer pass the LofitModel itself (Trainer(model=lofit_model, ...))."
            )
        real = type(self).save_pretrained  # type: ignore[attr-defined]  # resolved now: the class may change
        return real(self, *args, **kwargs)

    save_pretrained.__doc__ = real_save.__doc__
    setattr(inner, "save_pretrained", types.MethodType(save_pretrained, inner))  # noqa: B010
