"""The LM-head pre-hook: every LoFiT model feeds its LM head a contiguous input (fast frozen generate)."""

from __future__ import annotations

import torch
from torch import nn

from lofit import LofitConfig, get_lofit_model
from tiny_models import tiny_model

HEADS = {0: [1], 2: [0, 3]}


def lm_head_inputs_contiguous(model: nn.Module, base: nn.Module) -> list[bool]:
    """Generate a few tokens and record whether each LM-head call got a contiguous input."""
    seen: list[bool] = []
    head = base.get_output_embeddings()  # type: ignore[operator]
    handle = head.register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous()))
    try:
        with torch.no_grad():
            model.generate(  # type: ignore[operator]
                input_ids=torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]]),
                attention_mask=torch.ones(2, 4, dtype=torch.long),
                max_new_tokens=3,
                do_sample=False,
                pad_token_id=0,
            )
    finally:
        handle.remove()
    return seen


def test_lofit_models_give_the_lm_head_contiguous_inputs_and_unload_removes_the_hook() -> None:
    base = tiny_model("llama").requires_grad_(False)
    assert not all(lm_head_inputs_contiguous(base, base))  # transformers' prefill slices hidden[:, -1:]
    model = get_lofit_model(base, LofitConfig(heads=HEADS, init_std=0.1))
    assert all(lm_head_inputs_contiguous(model, base))
    plain = model.unload()
    assert not all(lm_head_inputs_contiguous(plain, plain))


def test_merged_models_keep_the_hook_and_give_the_same_tokens() -> None:
    base = tiny_model("llama").requires_grad_(False)
    model = get_lofit_model(base, LofitConfig(heads=HEADS, init_std=0.3)).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        unmerged = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        merged = model.merge_and_unload()
        assert all(lm_head_inputs_contiguous(merged, merged))
        again = merged.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)  # type: ignore[operator]
    assert torch.equal(unmerged, again)
