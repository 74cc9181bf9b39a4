"""Per-record evaluation logs (`lofit eval --log-samples`, `lofit run --log-samples`), lm-eval's `--log_samples`.

One JSON object per record, in record order, with the same keys for every task:

- `index`: the record's position; `prompt`: the exact text the model was given (templates and primer applied);
- `choices` and `scores`: each scored continuation (as appended to the prompt) and its summed log-probability
  (multiple choice, TruthfulQA), or `generation`: the greedy completion (exact match);
- `prediction`: the chosen choice's index (mc), the highest-scored answer (TruthfulQA) or the extracted answer;
- `gold`: the answer index (mc), the correct answers (TruthfulQA, best first; exact match);
- the record's own metrics (`correct`, `mc1`, `mc2`, ...).

Example:
    >>> detail = {"prompt": "Q?", "continuations": [" a", " b"], "scores": [-1.0, -0.5], "prediction": 1,
    ...           "prediction_norm": 1, "answer": 1, "correct": True, "correct_norm": True,
    ...           "question": "Q?", "choices": ["a", "b"]}
    >>> sample_rows("mc", [detail])[0]["gold"], sample_rows("mc", [detail])[0]["choices"]
    (1, [' a', ' b'])
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from ..errors import LofitValueError
from ..io.atomic import atomic_write_text


def _mc_row(detail: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": detail["prompt"],
        "choices": detail["continuations"],
        "scores": detail["scores"],
        "prediction": detail["prediction"],
        "prediction_norm": detail["prediction_norm"],
        "gold": detail["answer"],
        "correct": detail["correct"],
        "correct_norm": detail["correct_norm"],
    }


def _truthfulqa_row(detail: dict[str, Any]) -> dict[str, Any]:
    answers = [detail["best_answer"], *detail["correct_answers"], *detail["incorrect_answers"]]
    scores = [detail["score_best"], *detail["scores_true"], *detail["scores_false"]]
    unique = dict(zip(answers, scores, strict=True))  # the best answer is usually among the true ones
    best = max(unique, key=lambda answer: unique[answer])
    return {
        "prompt": detail["prompt"],
        "choices": [" " + answer for answer in unique],
        "scores": list(unique.values()),
        "prediction": best,
        "gold": list(dict.fromkeys([detail["best_answer"], *detail["correct_answers"]])),
        "mc1": detail["mc1"],
        "mc2": detail["mc2"],
    }


def _exact_match_row(detail: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": detail["prompt"],
        "generation": detail["generation"],
        "prediction": detail["prediction"],
        "gold": detail["answers"],
        "correct": detail["correct"],
        "correct_stripped": detail["correct_stripped"],
    }


ROWS = {"mc": _mc_row, "truthfulqa_mc": _truthfulqa_row, "exact_match": _exact_match_row}


def sample_rows(task: str, details: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per record (see the module docstring) from `evaluate(..., return_details=True)`'s details."""
    if task not in ROWS:
        raise LofitValueError(f"no sample log for evaluation task {task!r}; known: {sorted(ROWS)}")
    return [{"index": index, **ROWS[task](detail)} for index, detail in enumerate(details)]


def write_samples(path: str | os.PathLike[str], task: str, details: Sequence[dict[str, Any]]) -> None:
    """Write `sample_rows(task, details)` as JSON lines to `path`, atomically."""
    rows = sample_rows(task, details)
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
