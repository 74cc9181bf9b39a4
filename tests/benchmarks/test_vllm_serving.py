"""The serving benchmark's overhead statistics: paired by round, and by the two modes' medians."""

from __future__ import annotations

import pytest
from benchmarks.vllm_serving import overheads


def test_the_headline_is_the_median_of_each_rounds_paired_overhead() -> None:
    # Round 1 ran on a slower machine for both modes: pairing cancels it, the ratio of medians does not.
    runs = {
        "base": [{"tokens": 100, "s": 1.0}, {"tokens": 100, "s": 2.0}, {"tokens": 100, "s": 1.0}],
        "adapters": [{"tokens": 100, "s": 1.02}, {"tokens": 100, "s": 2.04}, {"tokens": 100, "s": 1.5}],
    }
    stats = overheads(runs, "s")
    assert stats["paired"] == [pytest.approx(1 - 1 / 1.02, abs=1e-4)] * 2 + [pytest.approx(1 / 3, abs=1e-4)]
    assert stats["paired_median"] == pytest.approx(1 - 1 / 1.02, abs=1e-4)
    assert (stats["paired_min"], stats["paired_max"]) == (stats["paired"][0], stats["paired"][2])
    assert stats["tokens_per_s_median"] == {"base": 100.0, "adapters": round(100 / 1.5, 1)}
    assert stats["ratio_of_medians"] == pytest.approx(1 - (100 / 1.5) / 100, abs=1e-4)
