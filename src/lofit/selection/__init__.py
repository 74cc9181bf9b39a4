"""Step 1: rank attention heads (`select_heads`, `HeadSelection`); names load on first use.

| module | job |
|---|---|
| `select` | `select_heads` and `HeadSelection` (scores, ranking, `top(k)`, save / load) |
| `gradient` | one-pass gradient scores ("gradient", "gradient-adam") |
| `probe` | ITI-style linear probes per head ("probe") |
| `activations` | each head's z, recorded by hooks (probes, ITI) |
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


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'lofit.selection' has no attribute {name!r}")
    return getattr(importlib.import_module("lofit.selection.select"), name)
