"""Which scaled-dot-product-attention kernel a training forward uses: on CPUs, "math" for short sequences.

PyTorch picks its fused flash-attention kernel for `F.scaled_dot_product_attention` on CPUs. Its forward
is fast, but its backward has a large fixed cost per (sequence, head): measured on a 2-core Sapphire Rapids
VM (torch 2.13, bf16, one forward + backward of one attention call, 16 sequences × 9 heads × 64 dims), the
math kernel (plain matmuls + softmax) takes 27 ms at 40 tokens where flash takes 73 ms (64 tokens: 73 vs
97 ms), and they cross between 96 and 128 tokens (at 512: flash 3.5× faster); with Gemma 3's 256-dim heads
math still wins at 40 tokens (17 vs 26 ms, 4 heads) but loses at 96 (162 vs 123 ms). lofit's
training batches are often that short (TruthfulQA's DPO pairs: ~30-60 tokens), and attention is where a
LoFiT step spends its backward (the base is frozen, so no weight gradients are computed), so training
forwards of batches up to `MATH_ATTENTION_MAX_TOKENS` run the math kernel on CPUs. GPUs, longer batches
and models that do not use sdpa are left alone. Both kernels compute the same attention (they differ in
rounding only).

Example:
    >>> import torch
    >>> kernel = attention_kernel(torch.device("cpu"), longest=40)
    >>> with kernel:
    ...     pass
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

MATH_ATTENTION_MAX_TOKENS = 64
"""Longest padded sequence of a CPU training batch that runs sdpa's math kernel (see the module docstring)."""


def attention_kernel(device: torch.device, longest: int) -> contextlib.AbstractContextManager[Any]:
    """The sdpa kernel context of a training forward on `device` whose longest sequence has `longest` tokens.

    Args:
        device: where the model runs.
        longest: tokens of the batch's longest (padded) sequence.

    Returns:
        `sdpa_kernel([SDPBackend.MATH])` on CPUs for batches up to `MATH_ATTENTION_MAX_TOKENS`, else a no-op.
    """
    if device.type != "cpu" or longest > MATH_ATTENTION_MAX_TOKENS:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])
