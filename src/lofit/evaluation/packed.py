"""Packed scoring: every continuation of a request in one row, several requests per forward pass, no KV cache.

A request's row holds the tokens all its sequences share (normally its context), then each continuation's
remaining tokens one after another. A block attention mask lets a continuation token see the shared part
and the earlier tokens of its own continuation only, and its position id counts from the end of the
shared part, so it sees exactly what it sees in a plain forward of context + continuation: the same
log-probabilities from one pass over roughly `context + Σ continuations` tokens instead of
`k x (context + continuation)`. Rows are right-padded; padding is seen by no real token. A global
prefix (tokens every request shares) may run before, once: its KV cache is then visible to every row.

The mask is a 4D float mask `[rows, 1, width, prefix + width]` (0 where attention is allowed, the dtype's
minimum elsewhere), which Hugging Face models built on `masking_utils` take as is for eager and SDPA
attention; a model that ignores it gives different scores, so `lofit.evaluation.scoring` compares one
request against the KV-cache scorer before it trusts this path.

Example:
    >>> row = pack_request([[7, 8, 9], [7, 8, 5, 6]], [2, 2], start=0)
    >>> row.ids, row.positions, row.segments  # the last token of a continuation predicts nothing: left out
    ([7, 8, 5], [0, 1, 2], [0, 0, 2])
    >>> row.sources, row.targets  # the state at row index 1 predicts 9 and 5; index 2 predicts 6
    ([[1], [1, 2]], [[9], [5, 6]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..training.tokens import common_prefix_length
from .bounds import NonFiniteLogitsError, check_finite

PREFIX_SOURCE = -1  # a source index meaning "the global prefix's last state"


class Runner(Protocol):
    """Runs the model to the tables scores are read from (hidden states or logits) and projects them."""

    def forward(self, input_ids: torch.Tensor, cache: Any = None, **extra: Any) -> tuple[torch.Tensor, Any]:
        """`(states [rows, length, features], cache)`."""
        ...

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits of gathered state rows."""
        ...


@dataclass(frozen=True)
class PackedRow:
    """One request laid out in one row (positions relative to the whole sequence, global prefix included)."""

    ids: list[int]
    positions: list[int]
    segments: list[int]  # 0: the shared part; j + 1: continuation j
    sources: list[list[int]]  # per continuation: the row index whose state predicts each scored token
    targets: list[list[int]]  # per continuation: the scored tokens


def shared_length(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens all `sequences` share, leaving every sequence at least one token of its own.

    Example:
        >>> shared_length([[1, 2, 3], [1, 2]])
        1
    """
    return min(common_prefix_length(sequences), min(len(ids) for ids in sequences) - 1)


def pack_request(sequences: Sequence[list[int]], boundaries: Sequence[int], start: int) -> PackedRow:
    """The row of one request: its shared part after the global prefix, then each continuation's own tokens.

    Args:
        sequences: context + continuation token ids, one per continuation.
        boundaries: the index of each sequence's first scored token.
        start: the global prefix's length (run before, not part of the row).

    Returns:
        The row; a scored token predicted by the prefix's last state has source `PREFIX_SOURCE`.
    """
    shared = shared_length(sequences)
    ids, positions = list(sequences[0][start:shared]), list(range(start, shared))
    segments = [0] * len(ids)
    sources, targets = [], []
    for j, (sequence, boundary) in enumerate(zip(sequences, boundaries, strict=True)):
        offset, end = len(ids), len(sequence) - 1  # the last token predicts nothing scored: left out
        ids.extend(sequence[shared:end])
        positions.extend(range(shared, end))
        segments.extend([j + 1] * (end - shared))
        rows = []
        for p in range(boundary - 1, end):  # the state at position p predicts token p + 1
            if p < start:
                rows.append(PREFIX_SOURCE)
            else:
                rows.append(p - start if p < shared else offset + p - shared)
        sources.append(rows)
        targets.append(list(sequence[boundary:]))
    return PackedRow(ids, positions, segments, sources, targets)


def block_mask(segments: torch.Tensor, prefix_length: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive 4D mask of packed rows: causal, and a continuation token sees the shared part and its own
    continuation only; every row sees the whole global prefix.

    Args:
        segments: [rows, width] segment ids (0 shared, j + 1 continuation j, -1 padding).
        prefix_length: cached tokens before the rows.
        dtype: the model's float dtype.

    Returns:
        [rows, 1, width, prefix_length + width]: 0 where attention is allowed, the dtype's minimum elsewhere.

    Example:
        >>> mask = block_mask(torch.tensor([[0, 1, 2]]), 0, torch.float32)
        >>> (mask[0, 0] == 0).int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    """
    rows, width = segments.shape
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    keys, queries = segments[:, None, :], segments[:, :, None]
    allowed = causal & ((keys == 0) | (keys == queries))  # padding (-1) sees the shared part and padding
    allowed = torch.cat(
        [torch.ones(rows, width, prefix_length, dtype=torch.bool, device=segments.device), allowed], dim=-1
    )
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def score_rows(
    run: Runner,
    rows: Sequence[PackedRow],
    prefix_cache: Any,
    prefix_state: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:
    """Per-token log-probabilities of every continuation of `rows`, from one forward pass.

    Args:
        run: the model runner.
        rows: packed requests.
        prefix_cache: the global prefix's cache expanded to `len(rows)` rows, or None.
        prefix_state: the prefix's last state [1, features] (needed when a source is `PREFIX_SOURCE`).
        dtype: the model's float dtype (for the mask).
        device: where inputs go.

    Returns:
        One fp32 tensor of scored-token log-probabilities per continuation, rows in order.
    """
    width = max(1, *(len(row.ids) for row in rows))  # a row may be empty: all it scores is the prefix's
    ids = torch.tensor([row.ids + [0] * (width - len(row.ids)) for row in rows], device=device)
    positions = torch.tensor(
        [row.positions + [(row.positions or [0])[-1]] * (width - len(row.ids)) for row in rows], device=device
    )
    segments = torch.tensor([row.segments + [-1] * (width - len(row.ids)) for row in rows], device=device)
    prefix_length = 0 if prefix_cache is None else prefix_cache.get_seq_length()
    states, _ = run.forward(
        ids,
        prefix_cache,
        attention_mask=block_mask(segments, prefix_length, dtype),
        position_ids=positions,
    )
    table = states.reshape(-1, states.shape[-1])
    if prefix_state is not None:
        table = torch.cat([table, prefix_state.to(table.dtype)], dim=0)
    flat: list[int] = []
    tokens: list[int] = []
    lengths: list[int] = []
    for r, row in enumerate(rows):
        for sources, targets in zip(row.sources, row.targets, strict=True):
            flat.extend(len(table) - 1 if s == PREFIX_SOURCE else r * width + s for s in sources)
            tokens.extend(targets)
            lengths.append(len(targets))
    # A state that predicts a token of several continuations (the shared part's last state, a scored token
    # the continuations share) goes through the LM head and its log-sum-exp once.
    needed, rows_of_targets = torch.unique(torch.tensor(flat, device=device), return_inverse=True)
    logits = run.logits(table[needed])
    return list(target_logprobs(logits, torch.tensor(tokens, device=device), rows_of_targets).split(lengths))


def target_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """log p(target) for each target, in fp32.

    Args:
        logits: [n, vocab].
        targets: [m] token ids.
        rows: [m] the row of `logits` that predicts each target; by default row i predicts target i (m = n).

    Raises:
        NonFiniteLogitsError: a row holds NaN or +inf, or the target's logit is -inf (read off the
            log-sum-exp and the target logits: m values checked, not n x vocab).

    Example:
        >>> logits = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
        >>> target_logprobs(logits, torch.tensor([1, 0, 1]), rows=torch.tensor([1, 1, 0])).exp()
        tensor([0.8808, 0.1192, 0.5000])
    """
    if rows is None:
        rows = torch.arange(len(targets), device=targets.device)
    chosen = logits[rows, targets].float()
    total = row_logsumexp(logits)[rows]
    if not check_finite(torch.stack([chosen, total])):
        raise NonFiniteLogitsError("non-finite logits")
    return chosen - total


# About 1 MiB of fp32 per chunk. torch's CPU logsumexp makes several passes over its input (max, subtract,
# exp, sum); on rows that fit in cache it ran 2x (SmolLM2's 49k vocabulary) to 3.7x (Gemma 3's 262k) faster
# than on a [290, vocab] block in one call (2-core Xeon, fp32).
_LOGSUMEXP_CHUNK_ELEMENTS = 1 << 18


def row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """The fp32 log-sum-exp of each row of `logits` [n, vocab]: on CPU in chunks of rows that fit in cache
    (the same values as `torch.logsumexp(logits.float(), -1)`), elsewhere in one call.

    Example:
        >>> logits = torch.randn(40, 50_000)
        >>> torch.allclose(row_logsumexp(logits), torch.logsumexp(logits, dim=-1))
        True
    """
    rows = max(1, _LOGSUMEXP_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    if logits.device.type != "cpu" or logits.shape[0] <= rows:
        return torch.logsumexp(logits.float(), dim=-1)
    return torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in logits.split(rows)])
