"""Evaluation: `evaluate(model, tokenizer, task, data, **kwargs) -> dict[str, float]`.

Tasks (protocols in docs/method.md §6):
- "truthfulqa_mc": records {question, best_answer, correct_answers, incorrect_answers} -> {"mc1", "mc2"}.
  kwargs: instruction, primer (texts; default: read from `data_dir`/truthfulqa/), data_dir, scorer.
- "mc": records {question, choices, answer} -> {"accuracy", "accuracy_norm"}.
  kwargs: prompt_template ("{question}"), choice_template (" {choice}"), scorer.
- "exact_match": records {prompt, answers} -> {"exact_match"} and, unless extraction="clutrr" (which
  strips), {"exact_match_stripped"}. kwargs: extraction ("mquake" | "clutrr" | None), max_new_tokens (16).
Every task: batch_size (16), max_length (None: no truncation), progress (True: a tqdm bar),
precision (None: the model's own dtype; "bf16" / "fp16" / "auto": autocast, see
`lofit.evaluation.precision`), return_details (False). With return_details=True the call returns `(metrics, details)`, details being
one dict per record (scores, prediction, correctness) for reports.

`model` is a Hugging Face causal LM or a `lofit.LofitModel` (its adapter acts at every position, in
scoring and at every generation step). `scorer="fast"` (default) reuses KV caches of shared prefixes;
`scorer="naive"` scores every option from scratch and gives the same numbers.

>>> metrics = evaluate(model, tokenizer, "mc", [{"question": "2+2=", "choices": ["4", "5"], "answer": 0}])  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

from torch import nn

from ..errors import LofitValueError
from ..tasks.records import text_problem
from .exact_match import evaluate_exact_match
from .multiple_choice import evaluate_mc
from .precision import evaluation_precision
from .scoring import ScoringRequest, score_continuations
from .truthfulqa_mc import evaluate_truthfulqa_mc

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TASKS", "ScoringRequest", "evaluate", "score_continuations"]

_COMMON = {"batch_size", "max_length", "progress", "precision"}
TASKS: dict[str, tuple[Any, set[str]]] = {
    "truthfulqa_mc": (evaluate_truthfulqa_mc, _COMMON | {"instruction", "primer", "data_dir", "scorer"}),
    "mc": (evaluate_mc, _COMMON | {"prompt_template", "choice_template", "scorer"}),
    "exact_match": (evaluate_exact_match, _COMMON | {"extraction", "max_new_tokens"}),
}

Details = list[dict[str, Any]]


def _check_texts(record: Any, index: int) -> None:
    """Refuse a NUL byte or a lone surrogate in any text of `record` (no tokenizer takes them)."""
    if not isinstance(record, Mapping):
        raise LofitValueError(f"record {index} is a {type(record).__name__}, not a dict of fields")
    for name, value in record.items():
        for entry in value if isinstance(value, list) else [value]:
            problem = text_problem(entry) if isinstance(entry, str) else None
            if problem is not None:
                raise LofitValueError(f"record {index}, field {name!r}: {problem[0]}; {problem[1]}")


class EvaluationOptionError(LofitValueError, TypeError):
    """An option that the evaluation task does not take (a TypeError, as Python's own)."""


@overload
def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    data: Any,
    *,
    return_details: Literal[False] = ...,
    **kwargs: Any,
) -> dict[str, float]: ...
@overload
def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    data: Any,
    *,
    return_details: Literal[True],
    **kwargs: Any,
) -> tuple[dict[str, float], Details]: ...
def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    data: Any,
    *,
    return_details: bool = False,
    **kwargs: Any,
) -> dict[str, float] | tuple[dict[str, float], Details]:
    """Score `model` on `data` for `task` (protocols in docs/method.md §6; see the module docstring).

    Args:
        model: a Hugging Face causal LM or a `lofit.LofitModel`.
        tokenizer: its tokenizer.
        task: "truthfulqa_mc", "mc" or "exact_match".
        data: a list of record dicts (or a `datasets.Dataset`) in the task's record format.
        return_details: also return one dict per record (scores, prediction, correctness).
        **kwargs: the task's options (batch_size, max_length, progress, templates, extraction, ...).

    Returns:
        `{metric: value}` (fractions in [0, 1]), or `(metrics, details)` with `return_details=True`.

    Raises:
        LofitValueError: an unknown task, empty data or a malformed record.
        EvaluationOptionError: an option the task does not take (also a TypeError).
        NonFiniteLogitsError: the model gave NaN/inf logits; no metric is computed from them.
    """
    if not isinstance(model, nn.Module):
        raise LofitValueError(f"evaluate needs a causal LM (a torch.nn.Module), got {type(model).__name__}")
    if (
        tokenizer is None
        or isinstance(tokenizer, (str, bytes, os.PathLike))
        or not hasattr(tokenizer, "eos_token_id")
    ):
        raise LofitValueError(
            f"evaluate needs the model's Hugging Face tokenizer, got {type(tokenizer).__name__}"
        )
    if not isinstance(task, str) or task not in TASKS:
        raise LofitValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    run, accepted = TASKS[task]
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise EvaluationOptionError(
            f"evaluate(task={task!r}) got unexpected keyword(s) {unknown}; accepted: {sorted(accepted)}"
        )
    if data is None or isinstance(data, (str, bytes, dict)):
        raise LofitValueError(
            f"evaluate(task={task!r}): data must be a list of records (or a datasets.Dataset), got "
            f"{type(data).__name__}"
        )
    records = list(data)
    if not records:
        raise LofitValueError(f"evaluate(task={task!r}): data is empty")
    for index, record in enumerate(records):
        _check_texts(record, index)
    with evaluation_precision(model, kwargs.pop("precision", None)):
        metrics, details = run(model, tokenizer, records, **kwargs)
    return (metrics, details) if return_details else metrics
