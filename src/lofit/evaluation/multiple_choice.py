"""Multiple choice by log-likelihood: score each option after the question, pick the highest.

Context = `prompt_template.format(question=...)` (default "{question}": the record's question text as is);
continuation = `choice_template.format(choice=...)` (default " {choice}").
- accuracy: argmax of the summed log-probs.
- accuracy_norm: argmax of log-prob / len(choice) in characters (lm-eval-harness's acc_norm; the
  length of the choice text itself, without the template's leading space).
Ties go to the first option (numpy argmax, as lm-eval).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from ..errors import LofitValueError
from .scoring import Scorer, ScoringRequest, score_continuations

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_PROMPT_TEMPLATE = "{question}"
DEFAULT_CHOICE_TEMPLATE = " {choice}"


def argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (ties go to the first option, as numpy and lm-eval).

    Args:
        values: the scores.

    Returns:
        The index.

    Example:
        >>> argmax([0.1, 0.7, 0.7])
        1
    """
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _check(record: Any, index: int) -> None:
    for field in ("question", "choices", "answer"):
        if field not in record:
            raise LofitValueError(
                f"mc record {index} lacks '{field}'; records need question, choices, answer"
            )
    choices, answer = record["choices"], record["answer"]
    if isinstance(choices, str) or len(choices) < 2:
        raise LofitValueError(f"mc record {index}: 'choices' must be a list of at least two strings")
    if (
        isinstance(answer, bool)
        or not isinstance(answer, numbers.Integral)
        or not 0 <= int(answer) < len(choices)
    ):
        raise LofitValueError(
            f"mc record {index}: 'answer' must be an index into choices (0..{len(choices) - 1})"
        )


def _detail(record: Any, option_scores: list[float]) -> dict[str, Any]:
    """Predictions (raw and length-normalised) and correctness of one question."""
    normalised = [s / max(len(c), 1) for s, c in zip(option_scores, record["choices"], strict=True)]
    prediction, prediction_norm = argmax(option_scores), argmax(normalised)
    return {
        "question": record["question"],
        "choices": list(record["choices"]),
        "answer": int(record["answer"]),
        "scores": option_scores,
        "prediction": prediction,
        "prediction_norm": prediction_norm,
        "correct": prediction == record["answer"],
        "correct_norm": prediction_norm == record["answer"],
    }


def evaluate_mc(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Any],
    *,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    choice_template: str = DEFAULT_CHOICE_TEMPLATE,
    scorer: Scorer = "fast",
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Accuracy and length-normalised accuracy of log-likelihood multiple choice.

    Args:
        model: a causal LM or a `LofitModel`.
        tokenizer: its tokenizer.
        records: "mc" records {question, choices, answer}.
        prompt_template: the context, formatted with `question`.
        choice_template: each continuation, formatted with `choice`.
        scorer, batch_size, max_length, progress: see `score_continuations`.

    Returns:
        `({"accuracy", "accuracy_norm"}, details)`, one detail dict per record (scores, predictions, correct).
    """
    requests = []
    for index, record in enumerate(records):
        _check(record, index)
        context = prompt_template.format(question=record["question"])
        requests.append(
            ScoringRequest(context, [choice_template.format(choice=c) for c in record["choices"]])
        )
    scores = score_continuations(
        model,
        tokenizer,
        requests,
        scorer=scorer,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
    )
    details = [
        {
            "prompt": request.context,
            "continuations": list(request.continuations),
            **_detail(record, option_scores),
        }
        for record, request, option_scores in zip(records, requests, scores, strict=True)
    ]
    count = max(len(details), 1)
    metrics = {
        "accuracy": sum(d["correct"] for d in details) / count,
        "accuracy_norm": sum(d["correct_norm"] for d in details) / count,
    }
    return metrics, details
