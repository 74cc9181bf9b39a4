"""`Task`: one benchmark's records for every split, its objective, evaluation protocol and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import LofitValueError
from .defaults import defaults_for
from .records import Record

MC_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"

Objective = Literal["sft", "dpo"]
EvalTask = Literal["truthfulqa_mc", "mc", "exact_match"]
Extraction = Literal["mquake", "clutrr", "number"]

GENERATION_MAX_NEW_TOKENS = 16  # LoFiT's evaluate_mquake / evaluate_clutrr: greedy, 16 new tokens


def paper_defaults(name: str) -> dict[str, float | int | str]:
    """The defaults of one of the paper's tasks (or any task with its own row in `lofit.tasks.defaults`)."""
    return defaults_for(name).as_dict()


def generic_defaults(objective: str) -> dict[str, float | int | str]:
    """The defaults of a task without its own row, by its training objective ("sft" or "dpo")."""
    return defaults_for(objective).as_dict()


@dataclass
class Task:
    """Everything a run needs to know about one task.

    - `train`, `val`: training records ("sft" or "dpo" format, per `objective`).
    - `val_eval`, `test`: evaluation records in the `eval_task` format ("truthfulqa_mc", "mc" or
      "exact_match"); `val_eval` is the validation split for model selection (may be empty).
    - `extraction`: how to read the answer out of generated text for "exact_match" tasks: "mquake"
      (text after the last "A:" up to the first newline, lower-cased) or "clutrr" (text up to the first
      ".", stripped, lower-cased); None = the evaluator's plain exact match.
    - `max_new_tokens`: greedy generation length for "exact_match" (16, as LoFiT), else None.
    - `defaults`: per-task hyperparameters (l1, lr_select, lr_train, epochs, batch_size, k, beta for DPO, select_method).
    - `sources`: where each split came from; `info`: extra facts (fold, seed, sampled ids, ...).
    - `eval_options`: keyword arguments for `lofit.evaluation.evaluate` (the "mc" prompt templates).
    """

    name: str
    objective: Objective
    eval_task: EvalTask
    train: list[Record]
    val: list[Record]
    val_eval: list[Record]
    test: list[Record]
    extraction: Extraction | None = None
    max_new_tokens: int | None = None
    defaults: dict[str, float | int | str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    eval_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.objective not in ("sft", "dpo"):
            raise LofitValueError(f"Task.objective must be 'sft' or 'dpo', got {self.objective!r}")
        if self.eval_task not in ("truthfulqa_mc", "mc", "exact_match"):
            raise LofitValueError(
                f"Task.eval_task must be truthfulqa_mc, mc or exact_match, got {self.eval_task!r}"
            )
        if self.extraction not in (None, "mquake", "clutrr", "number"):
            raise LofitValueError(
                f"Task.extraction must be None, 'mquake', 'clutrr' or 'number', got {self.extraction!r}"
            )
        if self.eval_task == "exact_match" and self.max_new_tokens is None:
            self.max_new_tokens = GENERATION_MAX_NEW_TOKENS
        if self.eval_task == "mc" and not self.eval_options:
            # Score options exactly as SFT training on "mc" records presents them (mc_to_sft).
            self.eval_options = {"prompt_template": MC_PROMPT_TEMPLATE, "choice_template": " {choice}"}

    def summary(self) -> str:
        """One line, e.g. "truthfulqa: dpo training 326/82, truthfulqa_mc val 82 test 409".

        Returns:
            The summary.
        """
        return (
            f"{self.name}: {self.objective} training {len(self.train)}/{len(self.val)}, "
            f"{self.eval_task} val {len(self.val_eval)} test {len(self.test)}"
        )
