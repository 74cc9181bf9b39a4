"""LoFiT: localized fine-tuning of attention heads for any Hugging Face causal language model."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"  # first, so submodules may import it during `import lofit`

from .adapters.config import LofitConfig

if TYPE_CHECKING:
    from .adapters.composition import combine_adapters
    from .adapters.model import LofitModel, get_lofit_model

# Everything that imports torch loads on first use, so `import lofit` (and `lofit --help`) stays fast.
_LAZY = {
    "LofitModel": "lofit.adapters.model",
    "get_lofit_model": "lofit.adapters.model",
    "HeadSelection": "lofit.selection.ranking",
    "select_heads": "lofit.selection.select",
    "train_offsets": "lofit.training.offsets",
    "load_model": "lofit.io.loading",
    "evaluate": "lofit.evaluation",
    "combine_adapters": "lofit.adapters.composition",
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
