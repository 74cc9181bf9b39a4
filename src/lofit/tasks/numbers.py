"""Numbers as answers (SVAMP, GSM8K): one pattern that finds them and one canonical way to write them."""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def canonical_number(text: str) -> str:
    """A number written one way: commas dropped, integral values without a fraction ("" if none).

    >>> canonical_number("1,200.0"), canonical_number("-0.50"), canonical_number("x")
    ('1200', '-0.5', '')
    """
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return ""
    return str(int(value)) if value.is_integer() else repr(value)
