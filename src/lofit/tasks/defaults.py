"""The one home of lofit's default hyperparameters: per task (k, epochs, learning rates, λ, β) and for the API.

Every reader goes through this module: `select_heads` / `train_offsets` (their keyword defaults), the task
loaders (`Task.defaults`) and every CLI command (`lofit run`, `select`, `train`), so `lofit train --task
mquake` and `lofit run --task mquake` keep the same k. Imports no torch.

The paper's three tasks use the authors' Llama-2-7B settings (docs/method.md §2, §5): `l1` = λ of the
head-selection step, `lr_select` / `lr_train` = learning rates of step 1 / step 2, `k` = fraction of all
heads kept (their scripts keep 32 of Llama-2-7B's 1,024 heads, about 3%). Generic tasks use the middle of
the paper's λ range and 10% of heads, the paper's "best balance". Small models may want other values:
tune them on `val`, never on `test`.

Example:
    >>> from lofit.tasks.defaults import defaults_for
    >>> defaults_for("mquake").k, defaults_for("sft").k
    (0.03, 0.1)
    >>> defaults_for("arc_easy", objective="sft").l1    # a task without its own row: its objective's
    0.001
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskDefaults:
    """Default hyperparameters of one task.

    Args:
        k: heads to tune, an int (count) or a float in (0, 1] (fraction of all heads).
        l1: λ, the L1 strength of head selection.
        epochs: passes over the training records (both steps).
        batch_size: training batch size (both steps).
        lr_select: learning rate of head selection (step 1).
        lr_train: learning rate of offset training (step 2).
        beta: the DPO β (None for SFT tasks).
        select_method: how `lofit run` / `lofit select` rank heads unless `--select-method` says
            otherwise: "lofit" (the paper's L1 selection) or, where it was shown to give the same step-2
            result, "gradient-adam" (one gradient pass; TruthfulQA fold 0 on SmolLM2-135M: MC1 / MC2
            29.1 / 52.7 after either selector, selection ~3-5x cheaper; docs/run-breakdown.md).
    """

    k: float | int
    l1: float
    epochs: int = 5
    batch_size: int = 8
    lr_select: float = 5e-3
    lr_train: float = 1e-2
    beta: float | None = None
    select_method: str = "lofit"

    def as_dict(self) -> dict[str, float | int | str]:
        """The defaults as a plain dict, without unset fields (e.g. no `beta` for SFT tasks).

        Returns:
            `{"k": ..., "l1": ..., "epochs": ..., ...}`.
        """
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


# Declarative table: one row per task that has its own settings.
TASK_DEFAULTS: dict[str, TaskDefaults] = {
    "truthfulqa": TaskDefaults(k=0.03, l1=5e-4, beta=0.5, select_method="gradient-adam"),
    "mquake": TaskDefaults(k=0.03, l1=1e-3),
    "clutrr": TaskDefaults(k=0.03, l1=5e-3, lr_select=5e-4),
    "sft": TaskDefaults(k=0.1, l1=1e-3),
    "dpo": TaskDefaults(k=0.1, l1=5e-4, beta=0.5),
}

# Keyword defaults of the Python API when no task is involved (select_heads / train_offsets).
SELECT_HEADS_DEFAULTS: dict[str, Any] = {"lr": 5e-3, "l1": 5e-4}
TRAIN_OFFSETS_DEFAULTS: dict[str, Any] = {"lr": 1e-2}


def defaults_for(task: str, objective: str | None = None) -> TaskDefaults:
    """The defaults of `task`, or of its training objective ("sft"/"dpo") when it has no row of its own.

    Args:
        task: a task name ("truthfulqa", "mquake", "clutrr", "sft", "dpo", or any other task).
        objective: the task's training objective, used for tasks without their own row.

    Returns:
        The task's `TaskDefaults`.

    Raises:
        KeyError: neither `task` nor `objective` has defaults (a programming error, not bad input).
    """
    if task in TASK_DEFAULTS:
        return TASK_DEFAULTS[task]
    return TASK_DEFAULTS[objective or "sft"]
