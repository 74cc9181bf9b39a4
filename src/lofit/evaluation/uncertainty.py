"""Standard errors of evaluation metrics from per-record scores, for report.md and metrics.json.

Every metric lofit reports is a mean over test records of a per-record score: 0/1 correctness for
`accuracy`, `accuracy_norm`, `mc1`, `exact_match`, `exact_match_stripped`; a probability mass in [0, 1]
for `mc2`. Its standard error:
- 0/1 scores: the binomial SE sqrt(p (1 - p) / n);
- other scores (MC2): the SE of the per-question mean, s / sqrt(n) with the sample std s (n - 1);
- the change (LoFiT - base) on the same records: the paired SE of the per-record differences,
  s_d / sqrt(n), which is smaller than combining the two SEs when the scores are correlated.
With n = 1 the SE is undefined (None). A 95% interval is about ±1.96 SE, except where a 0/1 metric is
0% or 100% (its binomial SE is 0 there): `wilson_interval` gives a 95% interval that stays honest at the
edges, and metrics.json carries it for every 0/1 metric.

Example:
    >>> from lofit.evaluation.uncertainty import standard_error, paired_standard_error
    >>> round(standard_error([1, 0, 1, 1]), 4)       # binomial: sqrt(0.75 * 0.25 / 4)
    0.2165
    >>> paired_standard_error([1, 0, 1, 1], [1, 1, 1, 1])
    0.25
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# Which per-record detail field (from `evaluate(..., return_details=True)`) each metric averages.
DETAIL_FIELDS: dict[str, str] = {
    "accuracy": "correct",
    "accuracy_norm": "correct_norm",
    "exact_match": "correct",
    "exact_match_stripped": "correct_stripped",
    "mc1": "mc1",
    "mc2": "mc2",
}
METHOD = (
    "binomial SE sqrt(p(1-p)/n) for 0/1 scores, SE of the per-question mean s/sqrt(n) otherwise (MC2); "
    "change: paired SE of per-record differences"
)


def _mean_and_sd(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance)


def standard_error(scores: Sequence[float]) -> float | None:
    """SE of the mean of per-record `scores` (binomial for 0/1 scores); None for fewer than 2 records.

    Args:
        scores: one score per record.

    Returns:
        The standard error, or None.
    """
    values = [float(s) for s in scores]
    n = len(values)
    if n < 2:
        return None
    if all(v in (0.0, 1.0) for v in values):
        p = sum(values) / n
        return math.sqrt(p * (1 - p) / n)
    return _mean_and_sd(values)[1] / math.sqrt(n)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion (95% for z = 1.96); None for n = 0.

    Args:
        successes: the number of 1 scores.
        n: the number of records.
        z: the normal quantile of the interval's level.

    Returns:
        `(low, high)` within [0, 1].

    Example:
        >>> [round(x, 4) for x in wilson_interval(0, 16)]     # 0 of 16 correct: the SE is 0, this is not
        [0.0, 0.1936]
    """
    if n <= 0:
        return None
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_standard_error(base: Sequence[float], adapted: Sequence[float]) -> float | None:
    """SE of the mean difference `adapted - base` over the same records; None for fewer than 2 records.

    Args:
        base: per-record scores of the base model.
        adapted: per-record scores of the adapted model, in the same order.

    Returns:
        The paired standard error, or None.
    """
    if len(base) != len(adapted):
        raise ValueError(f"paired scores need the same records, got {len(base)} and {len(adapted)}")
    differences = [float(a) - float(b) for b, a in zip(base, adapted, strict=True)]
    if len(differences) < 2:
        return None
    return _mean_and_sd(differences)[1] / math.sqrt(len(differences))


def per_record_scores(details: Sequence[Mapping[str, Any]], metric: str) -> list[float] | None:
    """The per-record scores behind `metric` (from `evaluate(..., return_details=True)`).

    Args:
        details: one detail dict per record.
        metric: a metric name ("accuracy", "mc2", ...).

    Returns:
        One float per record, or None when the details do not carry them.
    """
    field = DETAIL_FIELDS.get(metric)
    if field is None or not details or any(field not in d for d in details):
        return None
    return [float(d[field]) for d in details]


def metric_uncertainty(
    base: tuple[Mapping[str, float], Sequence[Mapping[str, Any]]],
    adapted: tuple[Mapping[str, float], Sequence[Mapping[str, Any]]],
) -> dict[str, Any]:
    """n and the standard errors of the base and adapted metrics and of their change.

    Args:
        base: `(metrics, details)` of the base model, as `evaluate(..., return_details=True)` returns.
        adapted: the same for the adapted model, on the same records.

    Returns:
        `{"n": n, "method": ..., "base": {metric: se}, "lofit": {metric: se}, "change": {metric: se},
        "interval95": {"base": {metric: (low, high)}, "lofit": {...}}}` (Wilson intervals of 0/1 metrics).
    """
    (base_metrics, base_details), (_, adapted_details) = base, adapted
    result: dict[str, Any] = {"n": len(base_details), "method": METHOD, "base": {}, "lofit": {}, "change": {}}
    result["interval95"] = {"base": {}, "lofit": {}}
    for metric in base_metrics:
        before, after = per_record_scores(base_details, metric), per_record_scores(adapted_details, metric)
        if before is None or after is None:
            continue
        result["base"][metric] = standard_error(before)
        result["lofit"][metric] = standard_error(after)
        result["change"][metric] = paired_standard_error(before, after)
        for side, scores in (("base", before), ("lofit", after)):
            if all(v in (0.0, 1.0) for v in scores):
                result["interval95"][side][metric] = wilson_interval(sum(scores), len(scores))
    return result
