"""Log-probability scoring of continuations: score(c | x) = Σ log p(token | everything before it) over c's tokens.

Two scorers compute the same numbers:
- "naive": one forward pass per (context, continuation) from scratch — the reference.
- "fast": the longest token prefix shared by *all* requests (e.g. TruthfulQA's instruction + 6-shot
  primer) is run once per call and its KV cache reused; per request, the part shared by its
  continuations (the question) is run once more on top of it; then all continuations of the request
  are scored in one batched pass from that cache (right-padded; causal attention never lets a real
  token see the padding, so no attention mask is needed).

The answer boundary is found robustly: tokenise the context and context + continuation; the scored
tokens are those past their longest common prefix (normally exactly the context's tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .kv_cache import fork_cache
from .runtime import common_prefix_length, device_of, encode, forward, inference

Scorer = Literal["fast", "naive"]


@dataclass(frozen=True)
class ScoringRequest:
    """One context and the continuations to score after it (the text scored is `context + continuation`)."""

    context: str
    continuations: Sequence[str]


@dataclass(frozen=True)
class _Tokenized:
    sequences: list[list[int]]  # context + continuation, one per continuation
    boundaries: list[int]  # index of each sequence's first continuation token


def score_continuations(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[ScoringRequest],
    *,
    scorer: Scorer = "fast",
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
) -> list[list[float]]:
    """Summed log-probabilities, `result[i][j]` for `requests[i].continuations[j]` (fp32 log-softmax).

    `max_length` drops the oldest context tokens of longer sequences (the continuation is kept).
    `batch_size` caps how many continuations go through one batched forward pass ("fast" only).
    """
    if scorer not in ("fast", "naive"):
        raise ValueError(f"scorer must be 'fast' or 'naive', got {scorer!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokenized = [_tokenize(tokenizer, request, index, max_length) for index, request in enumerate(requests)]
    bar = tqdm(total=len(tokenized), desc=f"scoring ({scorer})", disable=not progress, leave=False)
    with inference(model):
        if scorer == "naive":
            scores = _score_naive(model, tokenized, bar)
        else:
            scores = _score_fast(model, tokenized, batch_size, bar)
    bar.close()
    return scores


def _tokenize(tokenizer: Any, request: ScoringRequest, index: int, max_length: int | None) -> _Tokenized:
    if not request.continuations:
        raise ValueError(f"scoring request {index} has no continuations")
    context_ids = encode(tokenizer, request.context)
    sequences, boundaries = [], []
    for continuation in request.continuations:
        ids = encode(tokenizer, request.context + continuation)
        boundary = common_prefix_length([context_ids, ids])
        if boundary == len(ids):
            raise ValueError(f"request {index}: continuation {continuation!r} adds no tokens to its context")
        if max_length is not None and len(ids) > max_length:
            cut = len(ids) - max_length
            ids, boundary = ids[cut:], boundary - cut
        if boundary < 1:
            raise ValueError(
                f"request {index}: the continuation {continuation!r} needs at least one context token before "
                f"it (context {request.context[:60]!r}, max_length={max_length}); give a non-empty context "
                "or raise max_length"
            )
        sequences.append(ids)
        boundaries.append(boundary)
    return _Tokenized(sequences, boundaries)


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row of `logits` [n, vocab], in fp32."""
    logits = logits.float()
    return logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def _score_naive(model: nn.Module, tokenized: list[_Tokenized], bar: Any) -> list[list[float]]:
    device = device_of(model)
    results = []
    for item in tokenized:
        scores = []
        for ids, boundary in zip(item.sequences, item.boundaries, strict=True):
            input_ids = torch.tensor([ids], device=device)
            logits = model(input_ids=input_ids, use_cache=False).logits[0]
            scores.append(_target_logprobs(logits[boundary - 1 : -1], input_ids[0, boundary:]).sum().item())
        results.append(scores)
        bar.update(1)
    return results


def _score_fast(
    model: nn.Module, tokenized: list[_Tokenized], batch_size: int, bar: Any
) -> list[list[float]]:
    device = device_of(model)
    everything = [ids for item in tokenized for ids in item.sequences]
    # The global prefix stops before the first continuation token of any sequence.
    global_length = min(common_prefix_length(everything), min(min(item.boundaries) for item in tokenized))
    global_cache, global_last = None, None
    if global_length > 0:
        logits, global_cache = forward(model, torch.tensor([everything[0][:global_length]], device=device))
        global_last = logits[0, -1:]  # predicts token `global_length`
    return [
        _score_request(model, item, global_length, global_cache, global_last, batch_size, bar)
        for item in tokenized
    ]


def _score_request(
    model: nn.Module,
    item: _Tokenized,
    global_length: int,
    global_cache: Any,
    global_last: torch.Tensor | None,
    batch_size: int,
    bar: Any,
) -> list[float]:
    device = device_of(model)
    sequences = item.sequences
    # Shared part of this request; every continuation keeps at least one token for the batched pass.
    shared_length = min(common_prefix_length(sequences), min(len(ids) for ids in sequences) - 1)
    cache = global_cache
    # shared_logits[k] are the logits at position `first_position + k`.
    pieces = [] if global_last is None else [global_last]
    first_position = global_length - 1 if global_last is not None else global_length
    if shared_length > global_length:
        start = None if global_cache is None else fork_cache(global_cache, 1)
        shared_ids = torch.tensor([sequences[0][global_length:shared_length]], device=device)
        logits, cache = forward(model, shared_ids, start)
        pieces.append(logits[0])
    shared_logits = torch.cat(pieces) if pieces else None

    scores: list[float] = []
    for begin in range(0, len(sequences), batch_size):
        chunk = range(begin, min(begin + batch_size, len(sequences)))
        suffixes = [sequences[j][shared_length:] for j in chunk]
        width = max(len(s) for s in suffixes)
        padded = torch.tensor([s + [s[-1]] * (width - len(s)) for s in suffixes], device=device)
        start = None if cache is None else fork_cache(cache, len(chunk))
        suffix_logits, _ = forward(model, padded, start)
        for row, j in enumerate(chunk):
            ids, boundary = sequences[j], item.boundaries[j]
            # Logits at position p predict token p + 1; positions < shared_length come from the shared passes.
            rows = []
            if boundary - 1 < shared_length:
                assert shared_logits is not None
                rows.append(shared_logits[boundary - 1 - first_position : shared_length - first_position])
            rows.append(
                suffix_logits[
                    row, max(boundary - 1, shared_length) - shared_length : len(ids) - 1 - shared_length
                ]
            )
            targets = torch.tensor(ids[boundary:], device=device)
            scores.append(_target_logprobs(torch.cat(rows), targets).sum().item())
    bar.update(1)
    return scores
