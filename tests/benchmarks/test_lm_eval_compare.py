"""The token accounting of benchmarks.lm_eval_compare, against hand counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from benchmarks.lm_eval_compare import argmax, body_tokens, logprob_differences


class WordTokenizer:
    """One token per whitespace-separated word (ids from a growing vocabulary)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[self.vocab.setdefault(w, len(self.vocab)) for w in text.split()])


def test_body_tokens_counts_shared_parts_once() -> None:
    pairs = [
        ("Q: a b", [" x y", " x z w"]),  # context 3 tokens; options share "x"
        ("Q: c", [" u", " v"]),  # context 2 tokens
    ]
    counts = body_tokens(WordTokenizer(), pairs)
    # lm-eval: each (context + option) minus its last token: (5-1) + (6-1) + (3-1) + (3-1) = 13
    assert counts["lm_eval"] == 13
    # lofit: global prefix "Q:" once (1); question 1 shares "Q: a b x" (4) -> +3, own: y -> 0 (last dropped),
    # "z w" -> 1 (w dropped); question 2 shares "Q: c" (2) -> +1, own tokens 0 each. 1 + 3 + 0 + 1 + 1 = 6
    assert counts["lofit"] == 6


def test_argmax_takes_the_first_maximum() -> None:
    assert argmax([1.0, 3.0, 3.0]) == 1


def test_non_finite_log_probs_give_no_metric() -> None:
    assert logprob_differences([[-1.0]], [[-1.25]]) == [0.25]
    for bad in (float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="non-finite"):
            logprob_differences([[-1.0]], [[bad]])
