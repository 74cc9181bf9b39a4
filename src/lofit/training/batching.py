"""Batching: the data order of an epoch, micro-batches, and right-padded token batches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from .encoding import EncodedSequence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_Item = TypeVar("_Item")


@dataclass
class TokenBatch:
    """Right-padded sequences plus the flat list of scored positions.

    Target j is token `targets[j]` of sequence `sequence_index[j]`, predicted from position
    `positions[j]` (= its index - 1) of that sequence.
    """

    input_ids: torch.Tensor  # [S, T]
    attention_mask: torch.Tensor  # [S, T]
    sequence_index: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    targets: torch.Tensor  # [N]

    @property
    def num_sequences(self) -> int:
        """S, the number of padded rows."""
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens in the batch."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> TokenBatch:
        """The batch with every tensor on `device`."""
        return TokenBatch(*(t.to(device) for t in self._tensors()))

    def first_sequence(self) -> TokenBatch:
        """The batch cut down to its first sequence (and that sequence's scored positions)."""
        keep = self.sequence_index == 0
        return TokenBatch(
            self.input_ids[:1],
            self.attention_mask[:1],
            self.sequence_index[keep],
            self.positions[keep],
            self.targets[keep],
        )

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.input_ids, self.attention_mask, self.sequence_index, self.positions, self.targets)


def collate(sequences: Sequence[EncodedSequence], pad_token_id: int) -> TokenBatch:
    """Right-pad `sequences` into one `TokenBatch` whose targets are their response tokens.

    Example:
        >>> batch = collate([EncodedSequence((5, 6, 7), 2), EncodedSequence((8, 9), 1)], pad_token_id=0)
        >>> batch.input_ids.tolist(), batch.targets.tolist(), batch.positions.tolist()
        ([[5, 6, 7], [8, 9, 0]], [7, 9], [1, 0])
    """
    lengths = torch.tensor([len(s.input_ids) for s in sequences])
    starts = torch.tensor([s.response_start for s in sequences])
    width = int(lengths.max())
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence.input_ids)] = torch.tensor(sequence.input_ids)
    index = torch.arange(width)
    attention_mask = (index[None, :] < lengths[:, None]).long()
    scored = (index[None, :] >= starts[:, None]) & attention_mask.bool()
    sequence_index, token_index = scored.nonzero(as_tuple=True)
    return TokenBatch(
        input_ids, attention_mask, sequence_index, token_index - 1, input_ids[sequence_index, token_index]
    )


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS, else 0 (padding is never scored)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def epoch_batches(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator, group_by_length: bool
) -> list[list[int]]:
    """One epoch's record indices, shuffled with `generator` and cut into batches.

    Args:
        lengths: each record's token count.
        batch_size: records per batch (the last batch may be smaller).
        generator: the data-order generator (its state decides the order; checkpoints save it).
        group_by_length: sort by length within chunks of 50 batches, then shuffle the batches.

    Returns:
        The batches, as lists of record indices.

    Example:
        >>> batches = epoch_batches([3, 1, 2, 5, 4], 2, torch.Generator().manual_seed(0), False)
        >>> sorted(i for batch in batches for i in batch), [len(b) for b in batches]
        ([0, 1, 2, 3, 4], [2, 2, 1])
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    chunk = 50 * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start : start + chunk], key=lambda i: -lengths[i])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def split_micro_batches(items: Sequence[_Item], parts: int) -> list[list[_Item]]:
    """`items` cut into at most `parts` consecutive micro-batches of (nearly) equal size.

    Example:
        >>> split_micro_batches([1, 2, 3, 4, 5], 2)
        [[1, 2, 3], [4, 5]]
    """
    size = max(1, math.ceil(len(items) / parts))
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
