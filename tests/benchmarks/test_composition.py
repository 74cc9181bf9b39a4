"""Smoke test of `python -m benchmarks.composition --quick` on a tiny random Llama (the real run is long)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny_models import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"


def load_script():  # type: ignore[no-untyped-def]
    from benchmarks import composition

    return composition


@pytest.mark.skipif(
    not ((DATA / "mquake").is_dir() and (DATA / "clutrr").is_dir()), reason="benchmark data not available"
)
def test_quick_run_on_tiny_model(tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"
    tiny_model("llama", 0).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    script = load_script()
    argv = ["--quick", "--model", str(model_dir), "--pairs", "mquake+clutrr", "--out", str(out)]
    assert script.main(argv) == 0
    units = json.loads((out / "composition_quick.json").read_text())["units"]
    assert set(units) == {"adapter/mquake", "adapter/clutrr", "pair/mquake+clutrr"}
    pair = units["pair/mquake+clutrr"]
    for task in ("mquake", "clutrr"):
        scores = pair[task]
        assert scores["n_test"] == 4
        for key in ("base", "own", "sum", "mean"):
            assert 0.0 <= scores[key]["exact_match"] <= 1.0
        delta = scores["sum"]["exact_match"] - scores["own"]["exact_match"]
        assert scores["sum_minus_own"]["exact_match"] == pytest.approx(delta)
    assert 0.0 <= pair["jaccard_heads"] <= 1.0
    text = (out / "composition_quick.md").read_text()
    assert "| mquake+clutrr" in text and "sum − own" in text
    assert script.main(argv) == 0  # resumes: nothing is rerun
    again = json.loads((out / "composition_quick.json").read_text())["units"]
    assert again["pair/mquake+clutrr"]["finished_at"] == pair["finished_at"]


def test_bad_pair_is_refused() -> None:
    script = load_script()
    with pytest.raises(SystemExit) as error:
        script.parse(["--pairs", "mquake+mquake"])
    assert error.value.code == 2
