"""LoFiT: localized fine-tuning of attention heads for any Hugging Face causal language model."""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .config import LofitConfig
from .model import LofitModel, get_lofit_model

# Heavier parts load on first use, so `import lofit` stays fast.
_LAZY = {
    "HeadSelection": "lofit.selection",
    "select_heads": "lofit.selection",
    "train_offsets": "lofit.tuning",
    "load_model": "lofit.loading",
    "evaluate": "lofit.evaluation",
}

__all__ = ["LofitConfig", "LofitModel", "__version__", "get_lofit_model", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lofit' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
