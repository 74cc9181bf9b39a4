"""Selector "random": a seeded uniform random score per head (the paper's random-heads baseline).

Example:
    >>> from lofit.selection.selectors import SELECTORS
    >>> SELECTORS["random"].score
    'uniform random number (seeded)'
"""

from __future__ import annotations

import torch

from .selectors import SelectionRequest, SelectorScores


def select(request: SelectionRequest) -> SelectorScores:
    """Scores: uniform random numbers from a generator seeded with `config.seed` (the model is not run)."""
    generator = torch.Generator().manual_seed(request.config.seed)
    geometry = request.geometry
    return SelectorScores(torch.rand(geometry.num_layers, geometry.num_heads, generator=generator))
