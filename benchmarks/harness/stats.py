"""Small statistics the benchmarks share: seeded subsets, mean ± standard error, head-set overlap."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from typing import Any


def sample(records: Sequence[Any], limit: int, seed: int) -> list[Any]:
    """A seeded random subset of `limit` records, in their order (all of them when there are fewer).

    Example:
        >>> sample(range(10), 3, seed=0)
        [0, 6, 9]
        >>> sample("abc", 0, seed=0)
        ['a', 'b', 'c']
    """
    records = list(records)
    if limit <= 0 or len(records) <= limit:
        return records
    picked = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in picked]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / √n; NaN for one value).

    Example:
        >>> mean_se([0.2, 0.4])
        (0.30000000000000004, 0.1)
        >>> mean_se([1.0])
        (1.0, nan)
    """
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def jaccard(a: Iterable[Sequence[int]], b: Iterable[Sequence[int]]) -> float:
    """|A ∩ B| / |A ∪ B| of two head sets given as (layer, head) pairs (0 for two empty sets).

    Example:
        >>> jaccard([(0, 1), (2, 3)], [[2, 3], (4, 5)])
        0.3333333333333333
    """
    first, second = {tuple(x) for x in a}, {tuple(x) for x in b}
    return len(first & second) / max(len(first | second), 1)
