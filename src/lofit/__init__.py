"""LoFiT: localized fine-tuning of attention heads for any Hugging Face causal language model."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .config import LofitConfig

if TYPE_CHECKING:
    from .composition import combine_adapters
    from .model import LofitModel, get_lofit_model

# Everything that imports torch loads on first use, so `import lofit` (and `lofit --help`) stays fast.
_LAZY = {
    "LofitModel": "lofit.model",
    "get_lofit_model": "lofit.model",
    "HeadSelection": "lofit.selection",
    "select_heads": "lofit.selection",
    "train_offsets": "lofit.tuning",
    "load_model": "lofit.loading",
    "evaluate": "lofit.evaluation",
    "combine_adapters": "lofit.composition",
}

__all__ = [
    "HeadSelection",
    "LofitConfig",
    "LofitModel",
    "__version__",
    "combine_adapters",
    "evaluate",
    "get_lofit_model",
    "load_model",
    "select_heads",
    "train_offsets",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lofit' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
