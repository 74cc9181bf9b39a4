"""The head selectors by name: the one table `select_heads` reads and the command line offers (no torch).

A selector is one module `lofit.selection.<module>` with one function of one signature,

    def select(request: SelectionRequest) -> SelectorScores

that scores every head of `request.base_model` (and may add what it did to `request.metadata`, which
heads.json records). Adding a selector is that file plus one entry in `SELECTORS`; `select_heads`, the
`--method` / `--select-method` choices and heads.json's description of the score all read this table.

Example:
    >>> METHODS
    ('lofit', 'random', 'probe', 'gradient', 'gradient-adam')
    >>> SELECTORS["random"].module
    'random'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import LofitValueError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from ..adapters.heads import HeadGeometry
    from ..tasks.records import Record
    from ..training.settings import TrainingConfig


@dataclass(frozen=True)
class Selector:
    """One table entry: the module `lofit.selection.<module>` defining `select`, and what a score means."""

    module: str
    score: str


SELECTORS: dict[str, Selector] = {
    "lofit": Selector("l1", "L2 norm of the head's scale A after L1-regularised training"),
    "random": Selector("random", "uniform random number (seeded)"),
    "probe": Selector(
        "probe",
        "validation accuracy of the head's logistic-regression probe (ties: lower validation loss)",
    ),
    "gradient": Selector(
        "gradient",
        "L2 norm of the mean task-loss gradient w.r.t. the head's scale A at A = 0 (one pass)",
    ),
    "gradient-adam": Selector(
        "gradient_adam",
        "L2 norm over the head's scale elements of max(0, |mean gradient| - l1) / RMS of the "
        "per-batch gradients at A = 0 (one pass)",
    ),
}
METHODS: tuple[str, ...] = tuple(SELECTORS)


@dataclass
class SelectionRequest:
    """Everything a selector is given: the model, the validated records and the options.

    `metadata` is what heads.json will record about the selection; a selector may add its own entries.
    """

    base_model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    records: list[Record]
    val_records: list[Record] | None
    objective: str
    config: TrainingConfig
    geometry: HeadGeometry
    target_modules: list[str] | None = None
    probe_l2: float = 1.0
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class SelectorScores:
    """What a selector returns: every head's score [layers, heads], higher is better.

    `tiebreak` orders equal scores (lower first); `history` is the training history, for selectors that
    train.
    """

    scores: torch.Tensor
    tiebreak: torch.Tensor | None = None
    history: dict[str, Any] | None = None


def check_method(method: str) -> Selector:
    """The table entry of `method`; LofitValueError naming the choices if there is none.

    Example:
        >>> check_method("gradient").score[:10]
        'L2 norm of'
    """
    if method not in SELECTORS:
        raise LofitValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    return SELECTORS[method]


def load_selector(method: str) -> Callable[[SelectionRequest], SelectorScores]:
    """The `select` function of the selector named `method` (its module is imported here)."""
    module = importlib.import_module(f"{__package__}.{check_method(method).module}")
    selector: Callable[[SelectionRequest], SelectorScores] = module.select
    return selector
