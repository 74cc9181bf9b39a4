"""Smoke test of `python -m benchmarks.mixed_batch --tiny` (the real run uses the bundled SmolLM2-135M)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_writes_results_and_checks_exactness(tmp_path: Path) -> None:
    from benchmarks import mixed_batch as module

    argv = ["--tiny", "--repeats", "1", "--seq-len", "8", "--prompt-len", "4", "--new-tokens", "2"]
    module.main([*argv, "--out", str(tmp_path)])
    report = json.loads((tmp_path / "mixed_batch.json").read_text())
    assert report["results"]["check"] == {
        "max_abs_logit_diff_vs_alone": 0.0,
        "all_a0_mixed_equals_single": True,
    }
    for workload in ("forward", "generate"):
        cpu = report["results"][workload]["cpu"]
        assert cpu["ratio_of_medians"] == cpu["mixed_median_s"] / cpu["single_median_s"]
    assert "| forward | process CPU |" in (tmp_path / "mixed_batch.md").read_text()
