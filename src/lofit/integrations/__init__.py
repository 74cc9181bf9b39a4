"""Glue between lofit and the Hugging Face training stack (transformers' Trainer, TRL).

`lofit.adapters.visibility` is imported by `LofitModel` itself and stays light; the trainer classes are
imported on first use, so `import lofit` never imports TRL.

Example:
    >>> import lofit.integrations as integrations
    >>> sorted(integrations.__all__)
    ['LofitDPOTrainer', 'LofitSFTTrainer', 'LofitTrainer', 'adapter_disabled_reference', 'export_peft_adapter']
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LofitDPOTrainer",
    "LofitSFTTrainer",
    "LofitTrainer",
    "adapter_disabled_reference",
    "export_peft_adapter",
]

_HOMES = {
    "LofitTrainer": "lofit.integrations.trainer",
    "LofitSFTTrainer": "lofit.integrations.trl",
    "LofitDPOTrainer": "lofit.integrations.trl",
    "adapter_disabled_reference": "lofit.integrations.trl",
    "export_peft_adapter": "lofit.integrations.peft",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'lofit.integrations' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
