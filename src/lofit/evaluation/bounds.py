"""Bounds on evaluation inputs and outputs: texts cut before tokenising, sequences cut to the model's
positions (with one warning that says how much was cut), and no metric from non-finite logits.

A text is cut to `CHARS_PER_TOKEN` characters per position the model has *before* it is tokenised, so
memory and time stay bounded whatever the input (a 10 MB single-line question would otherwise be
tokenised whole, and run through attention whole). No tokenizer makes tokens of 16 characters on
average, so the character cut only ever removes text that the token cut would remove anyway.

Example:
    >>> cuts = Cuts("scoring", max_length=4, source="max_length")
    >>> cuts.text("abcdefghijklmnopqrstuvwxyz" * 4, keep="end", key=0)[-3:]
    'xyz'
    >>> cuts.tokens([1, 2, 3, 4, 5, 6], keep="end", key=0)
    [3, 4, 5, 6]
    >>> cuts.summary()
    'scoring: 1 input(s) longer than 4 tokens (max_length) were cut from the left, by up to 40 characters before tokenising and 2 tokens after'
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..errors import LofitRuntimeError, LofitValueError
from ..training.encoding import max_positions
from .forward import causal_lm

CHARS_PER_TOKEN = 16


class NonFiniteLogitsError(LofitRuntimeError):
    """The model produced NaN or inf logits; no metric is reported from them."""


def model_max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows (None when the config names no limit).

    Args:
        model: a causal LM or a `LofitModel`.

    Returns:
        `max_position_embeddings` (or `n_positions`, ...) of its config (`training.encoding.max_positions`).
    """
    return max_positions(causal_lm(model))


def resolve_max_length(model: nn.Module, max_length: int | None, reserve: int = 0) -> tuple[int | None, str]:
    """The token budget of one sequence: `max_length`, else the model's positions less `reserve`.

    Args:
        model: the model evaluated.
        max_length: the caller's limit (None: the model's).
        reserve: positions kept free (the tokens `generate` adds).

    Returns:
        `(limit, where it comes from)`; the limit is None only for a model that states no limit.
    """
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise LofitValueError(f"max_length must be an integer >= 2 (or None), got {max_length!r}")
        return max_length, "max_length"
    positions = model_max_positions(model)
    if positions is None:
        return None, ""
    if positions - reserve < 1:
        raise LofitValueError(
            f"the model has {positions} positions, fewer than the {reserve} new tokens asked for; lower max_new_tokens"
        )
    return positions - reserve, "the model's positions" + (f" less {reserve} new tokens" if reserve else "")


@dataclass
class Cuts:
    """Counts what was cut from evaluation inputs, for one warning at the end (`warn`)."""

    what: str
    max_length: int | None
    source: str = ""
    count: int = 0
    most_tokens: int = 0
    most_chars: int = 0
    _seen: set[int] = field(default_factory=set)

    def text(self, text: str, keep: Literal["start", "end"], key: int | None = None) -> str:
        """`text` cut to `CHARS_PER_TOKEN * max_length` characters (its end or its start kept)."""
        if self.max_length is None:
            return text
        limit = CHARS_PER_TOKEN * self.max_length
        if len(text) <= limit:
            return text
        self._count(key)
        self.most_chars = max(self.most_chars, len(text) - limit)
        return text[len(text) - limit :] if keep == "end" else text[:limit]

    def tokens(self, ids: list[int], keep: Literal["start", "end"], key: int | None = None) -> list[int]:
        """`ids` cut to `max_length` tokens (the last ones kept when `keep` is "end")."""
        if self.max_length is None or len(ids) <= self.max_length:
            return ids
        self._count(key)
        self.most_tokens = max(self.most_tokens, len(ids) - self.max_length)
        return ids[len(ids) - self.max_length :] if keep == "end" else ids[: self.max_length]

    def _count(self, key: int | None) -> None:
        if key is None or key not in self._seen:
            self.count += 1
            if key is not None:
                self._seen.add(key)

    def summary(self) -> str:
        """One sentence: how many inputs were cut, and by how much at most."""
        removed = []
        if self.most_chars:
            removed.append(f"{self.most_chars:,} characters before tokenising")
        if self.most_tokens:
            removed.append(f"{self.most_tokens:,} tokens after")
        return (
            f"{self.what}: {self.count} input(s) longer than {self.max_length} tokens ({self.source}) were cut "
            f"from the left, by up to {' and '.join(removed)}"
        )

    def warn(self) -> None:
        """Warn once with `summary()` if anything was cut."""
        if self.count:
            warnings.warn(self.summary() + "; the scores see only the end of those contexts", stacklevel=3)


def describe_model(model: nn.Module) -> str:
    """ "the adapter 'x' on <base>" for a model with an active adapter, else "the model <name>"."""
    config = getattr(causal_lm(model), "config", None)
    name = getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or type(model).__name__
    adapter = getattr(model, "active_adapter", None)
    if isinstance(adapter, str) and adapter and getattr(model, "adapter_names", None):
        return f"the adapter {adapter!r} on {name}"
    return f"the model {name}"


def non_finite_logits(model: nn.Module, where: str) -> NonFiniteLogitsError:
    """The error for NaN/inf logits met while `where` (e.g. "scoring request 3"), naming the model."""
    return NonFiniteLogitsError(
        f"{describe_model(model)} produced NaN/inf logits ({where}); no metric is reported from them. "
        "Check the adapter (evaluate the base model without it) or load the model in float32 (fp16 "
        "overflows more easily)"
    )


def check_finite(logits: torch.Tensor) -> bool:
    """Whether every logit is finite (one reduction; no copy to the host but the flag)."""
    return bool(torch.isfinite(logits).all())


class FiniteLogitsCheck:
    """A `generate` logits processor that notes (does not change) non-finite next-token logits."""

    def __init__(self) -> None:
        self.seen_non_finite = False

    def __call__(self, input_ids: Any, scores: torch.Tensor) -> torch.Tensor:
        if not self.seen_non_finite and not check_finite(scores):
            self.seen_non_finite = True
        return scores
