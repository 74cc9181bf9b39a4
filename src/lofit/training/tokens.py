"""Tokenising text the one way lofit does everywhere: the tokenizer's leading special tokens (BOS) kept,
nothing appended (no auto-added EOS), and the longest common prefix of token sequences.

Training (prompt/response boundaries), step 1's activations, the baselines and evaluation (scoring with
KV-cache reuse, generation) all tokenise through this module, so a text has the same ids everywhere.

Example:
    >>> class Tok:  # appends EOS (id 0) like some tokenizers do
    ...     eos_token_id = 0
    ...     def __call__(self, text, add_special_tokens=True):
    ...         ids = [ord(c) for c in text]
    ...         return {"input_ids": ids + [0] if add_special_tokens else ids}
    >>> encode(Tok(), "ab")
    [97, 98]
    >>> common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]])
    2
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def encode(tokenizer: PreTrainedTokenizerBase | Any, text: str) -> list[int]:
    """Token ids of `text` with the special tokens the tokenizer puts in front (BOS), none appended.

    Args:
        tokenizer: a Hugging Face tokenizer (or any callable `tokenizer(text, add_special_tokens=...)`
            returning `{"input_ids": [...]}` with an `eos_token_id` attribute).
        text: the text; an empty text gives just the leading special tokens.

    Returns:
        The token ids: `tokenizer(text)`'s ids cut after the last token of `text` itself.
    """
    full = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bare = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return drop_appended(full, bare, getattr(tokenizer, "eos_token_id", None))


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """`encode` for many texts at once (one batched tokenizer call each way).

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: the texts.

    Returns:
        One list of token ids per text, each equal to `encode(tokenizer, text)`.
    """
    if not texts:
        return []
    fulls: list[list[int]] = tokenizer(list(texts))["input_ids"]
    bares: list[list[int]] = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eos_id = tokenizer.eos_token_id
    return [drop_appended(list(f), list(b), eos_id) for f, b in zip(fulls, bares, strict=True)]


def drop_appended(full: list[int], bare: list[int], eos_id: int | None) -> list[int]:
    """`full` (ids with special tokens) without what the tokenizer appended after `bare` (the text's ids).

    The text's own ids are found as a run inside `full`; everything after the run is dropped. When they are
    not found as a run (a tokenizer whose special tokens change how the text itself splits) or the text is
    empty, only a final `eos_id` that the text itself does not end with is dropped.

    Example:
        >>> drop_appended([1, 7, 8, 2], [7, 8], eos_id=2)   # BOS 1 kept, EOS 2 dropped
        [1, 7, 8]
        >>> drop_appended([7, 2, 2], [7, 2], eos_id=2)      # the text's own EOS stays, the appended one goes
        [7, 2]
        >>> drop_appended([1, 2], [], eos_id=2)             # empty text: BOS only
        [1]
    """
    if bare and len(full) >= len(bare):
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return full[: start + len(bare)]
    if full and eos_id is not None and full[-1] == eos_id and (not bare or bare[-1] != eos_id):
        return full[:-1]
    return full


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all of `sequences` share (0 for none or no sequences).

    Example:
        >>> common_prefix_length([[1, 2, 3], [1, 2, 4, 5]])
        2
    """
    if not sequences:
        return 0
    first, length = sequences[0], min(len(s) for s in sequences)
    for i in range(length):
        token = first[i]
        if any(s[i] != token for s in sequences):
            return i
    return length
