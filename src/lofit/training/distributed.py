"""Processes and devices: the accelerator, model placement, the gradient all-reduce and clipping.

The adapter's gradients are tiny, so they are averaged across processes with one all-reduce per step
instead of wrapping the (frozen) base model in DistributedDataParallel; `accelerate launch` and
`torchrun` run the loop unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .settings import PRECISIONS
from .trainable import causal_lm_of

if TYPE_CHECKING:
    from accelerate import Accelerator


def make_accelerator(precision: str) -> Accelerator:
    """An Accelerator with this mixed precision ("fp32", "bf16" or "fp16").

    accelerate keeps one process-wide state; it is re-created when an earlier run (selection in fp32,
    then tuning in bf16) set another precision.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed = PRECISIONS[precision]
    try:
        return Accelerator(mixed_precision=mixed)
    except ValueError as error:
        if "already been initialized" not in str(error):
            raise
        AcceleratorState._reset_state()
        return Accelerator(mixed_precision=mixed)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and CUDA) random number generators."""
    from accelerate.utils import set_seed

    set_seed(seed)


def place_model(model: nn.Module, device: torch.device) -> torch.device:
    """Move `model` to `device` unless it is placed already; return the device its inputs go to.

    A model with a device map or bitsandbytes quantisation (which refuse `.to`) stays where it is.
    """
    causal_lm = causal_lm_of(model)
    placed = isinstance(getattr(causal_lm, "hf_device_map", None), dict) or getattr(
        causal_lm, "is_quantized", False
    )
    current = next(model.parameters()).device
    same = current.type == device.type and (
        None in (current.index, device.index) or current.index == device.index
    )
    if not placed and not same:
        model.to(device)
    get_embeddings = getattr(causal_lm, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) else device


def all_reduce_gradients(accelerator: Accelerator, params: Sequence[nn.Parameter]) -> None:
    """Average the parameters' gradients over all processes with one all-reduce (None counts as 0)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), "mean")
    offset = 0
    for param in params:
        param.grad = flat[offset : offset + param.numel()].view_as(param).clone()
        offset += param.numel()


def clip_gradients(accelerator: Accelerator, params: Sequence[nn.Parameter], max_norm: float) -> float:
    """Unscale (fp16) and clip the gradients to `max_norm` (0 = no clipping); return their total norm."""
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(list(params), max_norm))
    accelerator.unscale_gradients()
    grads = [p.grad.flatten() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads))) if grads else 0.0


def reduce_sum(accelerator: Accelerator, values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`values` summed over all processes (on the CPU)."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.reduce(values.to(device), "sum").cpu()
