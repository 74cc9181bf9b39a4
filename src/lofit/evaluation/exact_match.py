"""Exact match of greedy generations against gold answers (MQuAKE, CLUTRR and generic prompt/answers sets)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import LofitValueError
from .extraction import EXTRACTIONS, Extraction, extract, matches, strips_already
from .generation import generate_greedy

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _check(record: Any, index: int) -> None:
    for field in ("prompt", "answers"):
        if field not in record:
            raise LofitValueError(f"exact_match record {index} lacks '{field}'; records need prompt, answers")
    if isinstance(record["answers"], str) or not record["answers"]:
        raise LofitValueError(f"exact_match record {index}: 'answers' must be a non-empty list of strings")


def evaluate_exact_match(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Any],
    *,
    extraction: Extraction = None,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Exact match of greedy generations against the gold answers.

    Args:
        model: a causal LM or a `LofitModel`.
        tokenizer: its tokenizer.
        records: "exact_match" records {prompt, answers}.
        extraction: how to read the answer from the generation ("mquake", "clutrr" or None).
        max_new_tokens: tokens generated per prompt (16, as LoFiT).
        batch_size, max_length, progress: see `generate_greedy`.

    Returns:
        `({"exact_match"} plus "exact_match_stripped" unless the rule strips already, details)`, one detail
        dict per record (generation, prediction, correct).
    """
    if extraction not in EXTRACTIONS:
        raise LofitValueError(f"extraction must be one of {EXTRACTIONS}, got {extraction!r}")
    for index, record in enumerate(records):
        _check(record, index)
    generations = generate_greedy(
        model,
        tokenizer,
        [record["prompt"] for record in records],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
    )
    details = []
    for record, generation in zip(records, generations, strict=True):
        prediction = extract(generation.full_text, generation.completion, extraction)
        details.append(
            {
                "prompt": record["prompt"],
                "answers": list(record["answers"]),
                "generation": generation.completion,
                "prediction": prediction,
                "correct": matches(prediction, record["answers"], extraction),
                "correct_stripped": matches(prediction, record["answers"], extraction, stripped=True),
            }
        )
    count = max(len(details), 1)
    metrics = {"exact_match": sum(d["correct"] for d in details) / count}
    if not strips_already(extraction):
        metrics["exact_match_stripped"] = sum(d["correct_stripped"] for d in details) / count
    return metrics, details
