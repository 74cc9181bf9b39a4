"""The compute precision of an evaluation: `evaluate(..., precision="bf16")` runs the model under autocast.

Evaluation scores a frozen model, so its cost is its forward passes; where bf16 matmuls are fast (GPUs
with bf16, CPUs with AMX / avx512_bf16) bf16 autocast runs them 1.6-3x faster than fp32 (measured in
docs/run-breakdown.md). The weights stay as they are (fp32 parameters are cast per matmul by autocast);
a model whose weights are already bf16/fp16 runs in its own dtype whatever is asked.

- `None` (default) or "fp32": the model's own dtype, no autocast (exactly the numbers of before).
- "bf16" / "fp16": autocast to that dtype on the model's device type when its weights are fp32.
- "auto": bf16 where it is fast (`lofit.training.settings.fastest_precision`), else fp32.

Log-probabilities under bf16 differ from fp32 by ~1e-2 (relative to the logits' scale); a choice can flip
where two options score within that, so metrics move within their standard error (TruthfulQA fold 0 on
SmolLM2-135M: see docs/run-breakdown.md).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> with evaluation_precision(model, "bf16"):
    ...     model(torch.ones(1, 2)).dtype
    torch.bfloat16
    >>> with evaluation_precision(model, None):
    ...     model(torch.ones(1, 2)).dtype
    torch.float32
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..errors import LofitValueError

EVAL_PRECISIONS = (None, "auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_eval_precision(precision: str | None) -> str:
    """The concrete precision name ("fp32", "bf16" or "fp16") of `precision`.

    Example:
        >>> resolve_eval_precision(None), resolve_eval_precision("bf16")
        ('fp32', 'bf16')
    """
    if precision not in EVAL_PRECISIONS:
        raise LofitValueError(
            f"precision must be one of {[p for p in EVAL_PRECISIONS if p]} (or None: the model's own dtype), "
            f"got {precision!r}"
        )
    if precision == "auto":
        from ..training.settings import fastest_precision

        return fastest_precision()
    return precision or "fp32"


def evaluation_precision(model: nn.Module, precision: str | None) -> contextlib.AbstractContextManager[Any]:
    """A context in which `model`'s forwards run at `precision` (see the module docstring).

    Args:
        model: the model to evaluate.
        precision: None, "auto", "fp32", "bf16" or "fp16".

    Returns:
        `torch.autocast(...)` or a no-op context.
    """
    name = resolve_eval_precision(precision)
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    if name == "fp32" or parameter is None or parameter.dtype != torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=parameter.device.type, dtype=_DTYPES[name])
