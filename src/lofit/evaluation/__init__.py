"""Evaluation: `evaluate(model, tokenizer, task, data, **kwargs) -> dict[str, float]`.

Tasks (protocols in docs/method.md §6):
- "truthfulqa_mc": records {question, best_answer, correct_answers, incorrect_answers} -> {"mc1", "mc2"}.
  kwargs: instruction, primer (texts; default: read from `data_dir`/truthfulqa/), data_dir, scorer.
- "mc": records {question, choices, answer} -> {"accuracy", "accuracy_norm"}.
  kwargs: prompt_template ("{question}"), choice_template (" {choice}"), scorer.
- "exact_match": records {prompt, answers} -> {"exact_match"} and, unless extraction="clutrr" (which
  strips), {"exact_match_stripped"}. kwargs: extraction ("mquake" | "clutrr" | None), max_new_tokens (16).
Every task: batch_size (16), max_length (None: no truncation), progress (True: a tqdm bar),
return_details (False). With return_details=True the call returns `(metrics, details)`, details being
one dict per record (scores, prediction, correctness) for reports.

`model` is a Hugging Face causal LM or a `lofit.LofitModel` (its adapter acts at every position, in
scoring and at every generation step). `scorer="fast"` (default) reuses KV caches of shared prefixes;
`scorer="naive"` scores every option from scratch and gives the same numbers.

>>> metrics = evaluate(model, tokenizer, "mc", [{"question": "2+2=", "choices": ["4", "5"], "answer": 0}])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, overload

from torch import nn

from ..errors import LofitValueError
from .exact_match import evaluate_exact_match
from .multiple_choice import evaluate_mc
from .scoring import ScoringRequest, score_continuations
from .truthfulqa import evaluate_truthfulqa_mc

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TASKS", "ScoringRequest", "evaluate", "score_continuations"]

_COMMON = {"batch_size", "max_length", "progress"}
TASKS: dict[str, tuple[Any, set[str]]] = {
    "truthfulqa_mc": (evaluate_truthfulqa_mc, _COMMON | {"instruction", "primer", "data_dir", "scorer"}),
    "mc": (evaluate_mc, _COMMON | {"prompt_template", "choice_template", "scorer"}),
    "exact_match": (evaluate_exact_match, _COMMON | {"extraction", "max_new_tokens"}),
}

Details = list[dict[str, Any]]


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
        TypeError: an option the task does not take.
    """
    if task not in TASKS:
        raise LofitValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    run, accepted = TASKS[task]
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(
            f"evaluate(task={task!r}) got unexpected keyword(s) {unknown}; accepted: {sorted(accepted)}"
        )
    records = list(data)
    if not records:
        raise LofitValueError(f"evaluate(task={task!r}): data is empty")
    metrics, details = run(model, tokenizer, records, **kwargs)
    return (metrics, details) if return_details else metrics
