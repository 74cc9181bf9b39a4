"""Greedy batched generation with left padding.

Prompts are tokenised one by one (BOS as the tokenizer adds it), sorted by length so batches pad
little, left-padded with an attention mask (pad token = the tokenizer's pad, else its EOS), and
decoded back in the input order. Generation stops at `max_new_tokens` or at the tokenizer's EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LofitValueError
from ..training.tokens import encode_batch
from .bounds import Cuts, FiniteLogitsCheck, non_finite_logits, resolve_max_length
from .forward import device_of, inference

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Generation:
    """One greedy generation: `completion` (the new tokens decoded alone, special tokens skipped),
    `full_text` (prompt + new tokens decoded together) and `new_token_ids`.
    """

    completion: str  # the new tokens decoded alone (special tokens skipped)
    full_text: str  # prompt + new tokens decoded together, as LoFiT's evaluation decodes them
    new_token_ids: list[int]  # up to and including EOS when one was generated


def generate_greedy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
) -> list[Generation]:
    """Greedy continuations of `prompts`, batched with left padding.

    Args:
        model: a causal LM or a `LofitModel` (its adapter acts at every generation step).
        tokenizer: its tokenizer (needs a pad or an EOS token).
        prompts: the prompt texts.
        max_new_tokens: tokens generated per prompt (generation stops early at EOS).
        batch_size: prompts per `generate` call.
        max_length: keep only the last `max_length` tokens of longer prompts (None: the model's
            positions less `max_new_tokens`). A warning says how much was cut.
        progress: show a tqdm bar.

    Returns:
        One `Generation` per prompt, in order.

    Raises:
        NonFiniteLogitsError: the model gave NaN/inf next-token logits.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise LofitValueError(
            f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}"
        )
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise LofitValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    limit, source = resolve_max_length(model, max_length, reserve=max_new_tokens)
    cuts = Cuts("generation", limit, source)
    bounded = [cuts.text(prompt, "end", key=index) for index, prompt in enumerate(prompts)]
    encoded = [
        cuts.tokens(ids, "end", key=index) for index, ids in enumerate(encode_batch(tokenizer, bounded))
    ]
    cuts.warn()
    if any(not ids for ids in encoded):
        raise LofitValueError("a prompt tokenises to nothing; generation needs at least one prompt token")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: dict[int, Generation] = {}
    bar = tqdm(total=len(encoded), desc="generating", disable=not progress, leave=False)
    with inference(model):
        for begin in range(0, len(order), batch_size):
            batch = [encoded[i] for i in order[begin : begin + batch_size]]
            generated = _generate_batch(model, tokenizer, batch, max_new_tokens, pad, eos, begin)
            results.update(zip(order[begin : begin + batch_size], generated, strict=True))
            bar.update(len(batch))
    bar.close()
    return [results[i] for i in range(len(encoded))]


def _generate_batch(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batch: list[list[int]],
    max_new_tokens: int,
    pad: int,
    eos: int | None,
    first: int = 0,
) -> list[Generation]:
    """One left-padded `generate` call; each row's new tokens cut after its first EOS."""
    check = FiniteLogitsCheck()
    device = device_of(model)
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
    output = model.generate(  # type: ignore[operator]
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=eos,
        logits_processor=[check],
    )
    if check.seen_non_finite:
        raise non_finite_logits(
            model, f"generating for prompts {first}..{first + len(batch) - 1} (length order)"
        )
    generations = []
    for row, ids in enumerate(batch):
        new = output[row, width:].tolist()
        if eos is not None and eos in new:
            new = new[: new.index(eos) + 1]
        generations.append(
            Generation(
                completion=str(tokenizer.decode(new, skip_special_tokens=True)),
                full_text=str(tokenizer.decode(ids + new, skip_special_tokens=True)),
                new_token_ids=new,
            )
        )
    return generations
