"""The quantizations `load_model` offers (bitsandbytes, CUDA), named once; imports no torch, so the
command line's `--quantization` choices come from here.

Example:
    >>> QUANTIZATIONS
    ('4bit', '8bit')
"""

from __future__ import annotations

QUANTIZATIONS: tuple[str, ...] = ("4bit", "8bit")
