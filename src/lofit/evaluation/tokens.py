"""Tokenisation for scoring: token ids with the tokenizer's leading special tokens (BOS) but nothing
appended, and the longest common prefix of token sequences (for KV-cache reuse).

Example:
    >>> common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]])
    2
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text` with the special tokens the tokenizer puts in front (BOS), none appended.

    Args:
        tokenizer: a Hugging Face tokenizer.
        text: the text.

    Returns:
        The token ids.
    """
    return encode_batch(tokenizer, [text])[0]


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """`encode` for many texts at once (one batched tokenizer call each way).

    A tokenizer that appends EOS would otherwise make every scored continuation end in EOS.

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: the texts.

    Returns:
        One list of token ids per text.
    """
    if not texts:
        return []
    fulls: list[list[int]] = tokenizer(texts)["input_ids"]
    bares: list[list[int]] = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [_drop_appended(full, bare) for full, bare in zip(fulls, bares, strict=True)]


def _drop_appended(full: list[int], bare: list[int]) -> list[int]:
    if len(full) > len(bare):
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return full[: start + len(bare)]
    return full


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest common prefix of token sequences.

    Args:
        sequences: token id lists.

    Returns:
        The number of leading tokens all sequences share (0 for none).
    """
    if not sequences:
        return 0
    first, length = sequences[0], min(len(s) for s in sequences)
    for i in range(length):
        token = first[i]
        if any(s[i] != token for s in sequences):
            return i
    return length
