"""Smoke test of `python -m benchmarks.scale` (LoFiT vs LoRA vs RED on two model sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny_models import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"  # ../shared next to the checkout, as in CI


def load_scale():  # type: ignore[no-untyped-def]
    from benchmarks import scale

    return scale


def test_scale_pairs_differences_by_seed() -> None:
    scale = load_scale()
    points = {
        ("m", "mquake", "lofit", 16): {42: 0.30},  # seed 12450 of LoFiT has not finished
        ("m", "mquake", "lora", 16): {12450: 0.10, 42: 0.20},
    }
    assert scale.paired(points, "m", "mquake", 16) == pytest.approx([0.10])
    assert scale.paired(points, "m", "mquake", 16, "red") == []
    gaps = scale.missing(points, ["m"], {"mquake": [16], "clutrr": []})
    assert gaps == ["m MQuAKE n 16 lofit: seed 12450", "m MQuAKE n 16 red: seed 42, 12450"]


@pytest.mark.skipif(not (DATA / "mquake").is_dir(), reason="benchmark data not available")
def test_scale_runs_units_per_model_and_renders_the_table_and_plot(tmp_path: Path) -> None:
    scale = load_scale()
    model_dir = tmp_path / "tiny"
    tiny_model("llama", 0).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "scale"
    argv = [
        "--models",
        str(model_dir),
        "--out",
        str(out),
        "--quick",
        "--tasks",
        "mquake",
        "--sizes",
        "6",
        "4",
    ]
    argv += ["--seeds", "42"]
    assert scale.main(argv) == 0
    units = out / "tiny" / "units"
    names = sorted(p.name for p in units.glob("*.json"))
    methods = ("lofit", "lora", "red", "select")
    assert names == [f"fig4__mquake__n{n}__s42__{m}.json" for n in (4, 6) for m in methods]
    finished = {name: json.loads((units / name).read_text())["finished_at"] for name in names}
    assert finished["fig4__mquake__n4__s42__red.json"] <= finished["fig4__mquake__n6__s42__select.json"]
    assert json.loads((units / "fig4__mquake__n4__s42__lora.json").read_text())["settings"]["model"] == str(
        model_dir
    )
    text = (out / "scale.md").read_text()
    assert "| MQuAKE | 4 | " + str(model_dir) + " |" in text and (out / "scale.png").is_file()
    assert "| MQuAKE | 6 | " + str(model_dir) + " |" in text
    assert "MQuAKE n 4 lofit: seed 12450" in text  # the planned second seed is listed as missing
    stamps = {p.name: p.stat().st_mtime_ns for p in units.glob("*.json")}
    assert scale.main(argv) == 0  # resumes: nothing reruns
    assert {p.name: p.stat().st_mtime_ns for p in units.glob("*.json")} == stamps
    (out / "scale.md").unlink()
    assert scale.main([*argv, "--render-only"]) == 0 and (out / "scale.md").read_text() == text


def test_scale_model_source_passes_other_names_through(tmp_path: Path) -> None:
    curves = load_scale().curves
    assert curves.model_source("smollm2-135m") == "smollm2-135m"
    assert curves.model_source(str(tmp_path)) == str(tmp_path)
    assert "gemma3-270m" in curves.GGUF_MODELS  # dequantised once into a cached folder (not run here)
