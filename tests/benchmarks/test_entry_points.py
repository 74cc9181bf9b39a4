"""Every benchmark is a module of the `benchmarks` package: it runs as `python -m benchmarks.<name>`, has
no private files or `sys.path` edits, reaches lofit's internals only through `benchmarks.harness.internals`,
and the entry points without a smoke test elsewhere run here on a tiny random model."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "benchmarks"
DATA = ROOT.parent / "shared" / "data"  # ../shared next to the checkout, as in CI
ENTRY_POINTS = (
    "paper",
    "paper.check_ood",
    "curves",
    "scale",
    "speed",
    "composition",
    "selector_comparison",
    "step2_cache",
    "mixed_batch",
    "generate_overhead",
    "logit_lens",
    "vllm_serving",
    "lm_eval_compare",
    "model_speed",
)
INTERNALS = PACKAGE / "harness" / "internals.py"


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "results" not in p.parts)


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    model_dir = tmp_path / "tiny"
    tiny_model("llama", 0).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    return model_dir


def test_no_private_modules_and_no_path_edits() -> None:
    private = [
        p.relative_to(ROOT) for p in sources() if p.name.startswith("_") and not p.name.startswith("__")
    ]
    assert private == []
    edits = [p.relative_to(ROOT) for p in sources() if "sys.path" in p.read_text(encoding="utf-8")]
    assert edits == []
    tests = [p for p in (ROOT / "tests").rglob("*.py") if p != Path(__file__)]
    assert [p.relative_to(ROOT) for p in tests if "spec_from_file_location" in p.read_text()] == []
    private_imports = re.compile(r"from benchmarks[\w.]* import [^\n]*\b_[a-z]")
    assert [p.relative_to(ROOT) for p in tests if private_imports.search(p.read_text())] == []


def lofit_imports(path: Path) -> list[str]:
    """The `lofit.a.b` modules (two levels or more: below the public API) that `path` imports."""
    deep = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        deep += [name for name in names if name.startswith("lofit.") and name.count(".") >= 2]
    return deep


def test_lofit_internals_only_through_the_internals_module() -> None:
    found = {str(p.relative_to(ROOT)): lofit_imports(p) for p in sources() if p != INTERNALS}
    assert {path: names for path, names in found.items() if names} == {}
    assert lofit_imports(INTERNALS)  # the check finds deep imports where there are some


def test_speed_steps_through_lofits_own_optimizer_step() -> None:
    text = (PACKAGE / "speed" / "methods.py").read_text(encoding="utf-8")
    assert "optimizer_step(" in text and ".backward()" not in text and "clip_grad_norm_" not in text


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_runs_as_a_module(name: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--help"],
        cwd=ROOT.parent,  # not the root: the package is found through PYTHONPATH, as a user's would be
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_generate_overhead_on_a_tiny_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    from benchmarks import generate_overhead

    out = tmp_path / "overhead.json"
    assert generate_overhead.main(["--model", str(tiny_model_dir), "--repeats", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["seconds"]["base"]) == len(result["seconds"]["lofit"]) == 2
    low, high = result["speed_vs_base_range"]
    assert low <= result["speed_vs_base_median"] <= high and low > 0
    assert "python -m benchmarks.generate_overhead" in result["command"]


@pytest.mark.skipif(not (DATA / "truthfulqa").is_dir(), reason="benchmark data not available")
def test_model_speed_on_two_tiny_models(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from benchmarks import model_speed

    gemma_dir = tmp_path / "tiny-gemma"
    tiny_model("gemma3_text", 0).save_pretrained(gemma_dir)
    tiny_tokenizer().save_pretrained(gemma_dir)
    monkeypatch.setenv("LOFIT_DATA_DIR", str(DATA))
    argv = ["--models", str(tiny_model_dir), str(gemma_dir), "--records", "4", "--rounds", "2"]
    model_speed.main(
        [*argv, "--batch-size", "2", "--precision", "bf16", "--max-length", "96", "--out", str(tmp_path)]
    )
    report = json.loads((tmp_path / "model_speed.json").read_text())
    for name in (str(tiny_model_dir), str(gemma_dir)):
        assert [len(r["select"]["steps"]) for r in report["runs"][name]] == [2, 2]  # 4 pairs, batch 2
        assert all(report["summary"][name][step]["tokens_per_s"] > 0 for step in model_speed.STEPS)
    speed = report["summary"]
    expected = (
        speed[str(gemma_dir)]["train"]["tokens_per_s"] / speed[str(tiny_model_dir)]["train"]["tokens_per_s"]
    )
    assert report["ratios"]["train"] == pytest.approx(expected)
    assert "tokens/s" in (tmp_path / "model_speed.md").read_text()


@pytest.mark.skipif(not (DATA / "truthfulqa").is_dir(), reason="benchmark data not available")
def test_step2_cache_on_a_tiny_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    from benchmarks import step2_cache

    argv = ["--model", str(tiny_model_dir), "--configs", "lora", "upper_cached", "upper", "--records", "4"]
    argv += ["--epochs", "1", "--rounds", "1", "--max-length", "96", "--out", str(tmp_path)]
    assert step2_cache.main(argv) == 0
    report = json.loads((tmp_path / "step2_cache.json").read_text())
    assert [r["config"] for r in report["runs"]] == ["lora", "upper_cached", "upper"]
    assert all(r["losses"] and r["cpu_s"] > 0 for r in report["runs"])
    cached, plain = report["runs"][1]["losses"], report["runs"][2]["losses"]
    assert cached == pytest.approx(plain, abs=1e-4)  # the cache changes the cost, not the result
    text = (tmp_path / "step2_cache.md").read_text()
    assert "max |Δ loss|" in text and "upper half" in text


@pytest.mark.skipif(not (DATA / "truthfulqa").is_dir(), reason="benchmark data not available")
def test_selector_comparison_on_a_tiny_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    from benchmarks import selector_comparison

    argv = ["--model", str(tiny_model_dir), "--tasks", "truthfulqa", "--max-train", "8", "--max-test", "4"]
    argv += ["--select-epochs", "1", "--train-epochs", "1", "--max-length", "96"]
    argv += ["--step2", "lofit", "random"]
    assert selector_comparison.main([*argv, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "selectors.json").read_text())
    units = sorted(results["units"])
    assert units == [
        "select/truthfulqa/gradient",
        "select/truthfulqa/lofit",
        "select/truthfulqa/random",
        "step2/truthfulqa/lofit",
        "step2/truthfulqa/random",
    ]
    assert len(results["units"]["step2/truthfulqa/lofit"]["per_record"]["mc1"]) == 4
    text = (tmp_path / "selectors.md").read_text()
    stamp = (tmp_path / "selectors.json").stat().st_mtime_ns
    assert selector_comparison.main([*argv, "--out", str(tmp_path)]) == 0  # resumes: no unit reruns
    assert json.loads((tmp_path / "selectors.json").read_text())["units"] == results["units"]
    assert (tmp_path / "selectors.json").stat().st_mtime_ns >= stamp and text


def module_names() -> list[str]:
    names = []
    for path in sources():
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] != "__main__":
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.parametrize("module_name", module_names())
def test_docstring_examples_run(module_name: str) -> None:
    import doctest
    import importlib

    module = importlib.import_module(module_name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, module_name):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_docs_name_real_entry_points_and_pictures() -> None:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), PACKAGE / "__init__.py"]
    named = {
        m
        for path in docs
        for m in re.findall(r"python -m benchmarks\.([a-z0-9_.]+[a-z0-9])", path.read_text())
    }
    assert named and named <= set(ENTRY_POINTS)
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (ROOT / "docs" / "results.md").read_text())
    assert {Path(p).name for p in pictures} >= {"fig4.png", "fig5.png", "truthfulqa.png"}
    assert [p for p in pictures if not (ROOT / "docs" / p).is_file()] == []


def test_every_internal_name_is_documented() -> None:
    """The internals module is the documented door: each name it passes on has a row saying why."""
    from benchmarks.harness import internals

    documented = set(re.findall(r"`(\w+)`", (internals.__doc__ or "").split("| name |", 1)[1]))
    assert set(internals.__all__) <= documented, sorted(set(internals.__all__) - documented)
