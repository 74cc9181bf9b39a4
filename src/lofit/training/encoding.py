"""Tokenising: records -> token sequences with the prompt/response boundary found robustly.

Every sequence is prompt + response + EOS; only the response tokens and the EOS are scored. The
boundary is the longest common prefix of the tokenised prompt and the tokenised prompt + response, so it
is right for tokenizers that add a BOS token and for BPE merges across the boundary (a token that mixes
prompt and response text counts as response).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import DataError, LofitValueError
from .tokens import common_prefix_length, encode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
CHARS_PER_TOKEN = 16  # texts are cut to this many characters per token of max_length before tokenising


@dataclass(frozen=True)
class EncodedSequence:
    """Token ids of prompt + response (+ EOS); tokens at index >= `response_start` are scored.

    Example:
        >>> EncodedSequence((5, 6, 7, 2), response_start=2).num_targets
        2
    """

    input_ids: tuple[int, ...]
    response_start: int

    @property
    def num_targets(self) -> int:
        """How many tokens of the sequence are scored."""
        return len(self.input_ids) - self.response_start


@dataclass
class Example:
    """One training record, encoded: one sequence (SFT) or chosen + rejected (DPO)."""

    index: int
    sequences: tuple[EncodedSequence, ...]
    reference_logps: tuple[float, ...] | None = None  # DPO: the frozen base model's summed log-probs

    @property
    def num_tokens(self) -> int:
        """Tokens over all of the example's sequences."""
        return sum(len(s.input_ids) for s in self.sequences)


class SequenceEncoder:
    """Tokenises prompt/response pairs into `EncodedSequence`s, truncating prompts to `max_length`.

    Args:
        tokenizer: the model's tokenizer.
        max_length: longest sequence kept (prompts are cut from the left first); None keeps all.
        max_positions: the model's positions (`max_positions(model)`); without `max_length`, texts are
            cut to `CHARS_PER_TOKEN` characters per position before tokenising, so that memory stays
            bounded on any input (no tokenizer averages 16 characters a token, so nothing the model
            could read is lost).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int | None = None,
        max_positions: int | None = None,
    ) -> None:
        if max_length is not None and max_length < 2:
            raise LofitValueError(f"max_length must be at least 2 tokens (or None), got {max_length}")
        if (
            tokenizer is None
            or isinstance(tokenizer, (str, bytes, os.PathLike))
            or not hasattr(tokenizer, "eos_token_id")
        ):
            raise LofitValueError(
                "tokenizer must be the model's Hugging Face tokenizer (e.g. "
                f"AutoTokenizer.from_pretrained(name)), got {type(tokenizer).__name__}"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eos_id: int | None = tokenizer.eos_token_id
        if self.eos_id is None:
            warnings.warn(
                "the tokenizer has no eos_token; responses are scored without a final EOS token",
                stacklevel=2,
            )
        self.num_truncated = 0
        self.num_response_cut = 0  # truncations that cut the response too (not only the prompt)
        self.longest = 0  # tokens of the longest sequence before truncation
        self.most_cut = 0  # tokens removed from one sequence, at most
        self.max_positions = max_positions
        self.num_text_cut = 0  # texts cut to the character bound before tokenising (no max_length)
        self.most_chars_cut = 0

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` with the tokenizer's leading special tokens, without an auto-appended EOS."""
        return encode(self.tokenizer, text)

    def num_leading_specials(self, text: str) -> int:
        """How many special tokens (BOS) the tokenizer puts before `text`'s own tokens."""
        with_specials = self.tokenize(text)
        plain = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        extra = len(with_specials) - len(plain)
        return extra if extra > 0 and with_specials[extra:] == plain else 0

    def encode(self, prompt: str, response: str) -> EncodedSequence:
        """prompt + response + EOS as token ids, with the index of the first scored token.

        With `max_length`, the texts are first cut to `CHARS_PER_TOKEN * max_length` characters (the
        prompt's end and the response's start kept), so that no input makes tokenising unbounded.
        """
        if self.max_length is not None:
            limit = CHARS_PER_TOKEN * self.max_length
            prompt, response = prompt[max(len(prompt) - limit, 0) :], response[:limit]
        elif self.max_positions is not None:
            limit = CHARS_PER_TOKEN * self.max_positions
            cut = max(len(prompt) - limit, 0) + max(len(response) - limit, 0)
            if cut:
                self.num_text_cut += 1
                self.most_chars_cut = max(self.most_chars_cut, cut)
                prompt, response = prompt[max(len(prompt) - limit, 0) :], response[:limit]
        prompt_ids = self.tokenize(prompt)
        full = self.tokenize(prompt + response)
        start = common_prefix_length([prompt_ids, full])
        if self.eos_id is not None:
            full.append(self.eos_id)
        if start == 0:
            start = 1  # without BOS and prompt, the first token has no context to be predicted from
        if start >= len(full):
            raise DataError(
                None,
                None,
                None,
                f"the response {response!r} produced no tokens to score",
                "give every completion (chosen, rejected) text that the tokenizer turns into tokens",
            )
        self.longest = max(self.longest, len(full))
        if self.max_length is not None and len(full) > self.max_length:
            self.num_truncated += 1
            self.most_cut = max(self.most_cut, len(full) - self.max_length)
            full, start = self._truncate(full, start, self.num_leading_specials(prompt))
        return EncodedSequence(tuple(full), start)

    def _truncate(self, ids: list[int], start: int, num_specials: int) -> tuple[list[int], int]:
        # Drop prompt tokens from the left (after BOS); cut the response on the right only if it alone is
        # too long. At least one context token always stays before the first scored token.
        assert self.max_length is not None
        cut = min(num_specials, start)
        head, body, response = ids[:cut], ids[cut:start], ids[start:]
        keep_context = max(1 - len(head), 0)
        room = self.max_length - len(head) - len(response)
        if room >= keep_context:
            body = body[len(body) - room :] if room > 0 else []
        else:
            body = body[len(body) - keep_context :]
            response = response[: self.max_length - len(head) - len(body)]
            self.num_response_cut += 1
        return head + body + response, len(head) + len(body)


def max_positions(model: object) -> int | None:
    """The longest sequence `model`'s config allows (`max_position_embeddings`, `n_positions`, ...), or None.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> max_positions(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=64)))
        64
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
