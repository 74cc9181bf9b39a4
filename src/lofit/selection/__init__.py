"""Step 1: rank attention heads (`select_heads`, `HeadSelection`); names load on first use.

| module | job |
|---|---|
| `select` | `select_heads`: validates the inputs, runs the selector the table names |
| `ranking` | `HeadSelection` (scores, ranking, `top(k)`, save / load) and `rank_heads` |
| `selectors` | the selector table (name -> module, score meaning) and the one selector signature; no torch |
| `l1` | selector "lofit": L1-regularised scales, ranked by ‖A‖₂ |
| `random` | selector "random": seeded random scores |
| `probe` | selector "probe": ITI-style linear probes per head |
| `gradient` | selector "gradient": one-pass gradient scores |
| `gradient_adam` | selector "gradient-adam": the same pass, Adam + L1 rates |
| `activations` | the one activation recorder; each head's z (probes, ITI, RepE) |
| `heatmap` | the head-score heatmap (`heads.png`) |

Example:
    >>> import lofit.selection as selection
    >>> sorted(selection.__all__)
    ['HeadSelection', 'select_heads']
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["HeadSelection", "select_heads"]
_HOMES = {"HeadSelection": "lofit.selection.ranking", "select_heads": "lofit.selection.select"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'lofit.selection' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
