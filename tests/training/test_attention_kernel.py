"""CPU training forwards of short batches run sdpa's math kernel, and train to the same offsets."""

from __future__ import annotations

from unittest import mock

import torch

from lofit.training import attention_kernel as kernel_module
from lofit.training import step as step_module
from lofit.training.attention_kernel import MATH_ATTENTION_MAX_TOKENS, attention_kernel
from lofit.training.offsets import train_offsets
from tiny_models import tiny_model, tiny_tokenizer

RECORDS = [{"prompt": f"Q: {a} {b} A:", "completion": f" {a}{b}{a}"} for a in range(3) for b in range(3)]
HEADS = {0: [3], 1: [0, 2]}


def test_math_kernel_only_for_short_cpu_batches():
    with attention_kernel(torch.device("cpu"), MATH_ATTENTION_MAX_TOKENS):
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # restored on exit
    with attention_kernel(torch.device("cpu"), MATH_ATTENTION_MAX_TOKENS + 1):
        assert torch.backends.cuda.flash_sdp_enabled()
    with attention_kernel(torch.device("cuda"), 8):
        assert torch.backends.cuda.flash_sdp_enabled()


def _offsets(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.adapter_parameters()]


def test_training_uses_it_and_reaches_the_same_offsets() -> None:
    seen: list[int] = []
    original = step_module.attention_kernel

    def spy(device: torch.device, longest: int):  # type: ignore[no-untyped-def]
        seen.append(longest)
        return original(device, longest)

    kwargs = {"epochs": 2, "batch_size": 3, "lr": 5e-2, "progress": False, "seed": 0}
    with mock.patch.object(step_module, "attention_kernel", spy):
        with_math = train_offsets(tiny_model("llama"), tiny_tokenizer(), RECORDS, HEADS, **kwargs)
    assert seen and max(seen) <= MATH_ATTENTION_MAX_TOKENS  # these batches took the math kernel
    with mock.patch.object(kernel_module, "MATH_ATTENTION_MAX_TOKENS", 0):
        default = train_offsets(tiny_model("llama"), tiny_tokenizer(), RECORDS, HEADS, **kwargs)
    for a, b in zip(_offsets(with_math), _offsets(default), strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
