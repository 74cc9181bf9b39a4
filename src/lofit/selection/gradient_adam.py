"""Selector "gradient-adam": from the "gradient" selector's one pass, rank by the rate at which step 1's
Adam + L1 (λ = `config.l1`) would move each scale element (closer to the L1 ranking, as cheap; see
`lofit.selection.gradient`).

Example:
    >>> from lofit.selection.selectors import SELECTORS
    >>> SELECTORS["gradient-adam"].module
    'gradient_adam'
"""

from __future__ import annotations

import torch

from ..errors import LofitValueError
from .gradient import gradient_pass
from .selectors import SelectionRequest, SelectorScores


def select(request: SelectionRequest) -> SelectorScores:
    """Scores: the pass's `"adam_scores"`; refused when λ silences every head."""
    _, info = gradient_pass(request)
    scores = torch.tensor(info["adam_scores"])
    if not bool((scores > 0).any()):
        raise LofitValueError(
            f"method 'gradient-adam' scored every head 0: l1={request.config.l1:g} is larger than every element "
            "of the loss gradient, so no scale would move; lower l1 (the tasks use 5e-4 to 1e-3)"
        )
    return SelectorScores(scores)
