"""Smoke tests of `python -m benchmarks.paper` and `benchmarks.curves` (--quick) on a tiny random Llama."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"  # ../shared next to the checkout, as in CI


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    model_dir = tmp_path / "tiny"
    tiny_model("llama", 0).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    return model_dir


def load_script():  # type: ignore[no-untyped-def]
    from benchmarks.paper import run

    return run


def test_sample_is_seeded_subset() -> None:
    script = load_script()
    records = list(range(100))
    a, b = script.sample(records, 10, 0), script.sample(records, 10, 0)
    assert a == b and len(a) == 10 and a == sorted(a) and set(a) <= set(records)
    assert script.sample(records, 0, 0) == records and script.sample(records[:5], 10, 0) == records[:5]


def test_jaccard_matches_hand_count() -> None:
    from benchmarks.harness.internals import rank_heads
    from benchmarks.paper.render import top_jaccard as jaccard

    from lofit.selection import HeadSelection

    a = torch.tensor([[4.0, 3.0], [2.0, 1.0]])  # top 2: (0,0), (0,1)
    b = torch.tensor([[4.0, 1.0], [3.0, 2.0]])  # top 2: (0,0), (1,0)
    sa, sb = HeadSelection(a, rank_heads(a), "lofit"), HeadSelection(b, rank_heads(b), "lofit")
    assert jaccard(sa, sb, 2) == pytest.approx(1 / 3)
    assert jaccard(sa, sa, 2) == 1.0


@pytest.mark.skipif(not (DATA / "truthfulqa").is_dir(), reason="benchmark data not available")
def test_quick_run_on_tiny_model_writes_all_tables(tmp_path: Path, tiny_model_dir: Path) -> None:
    script = load_script()
    out = tmp_path / "out"
    argv = ["--quick", "--model", str(tiny_model_dir), "--out", str(out), "--folds", "0"]
    argv += ["--max-train", "4", "--max-val", "2", "--max-test", "2", "--max-ood", "2"]
    assert script.main(argv) == 0
    results = json.loads((out / "paper_tables_quick.json").read_text())
    units = results["units"]
    for unit in (
        "zero_shot/truthfulqa/f0",
        "lofit/mquake/f0/k0.1/lofit",
        "iti/clutrr/f0",
        "lora/truthfulqa/f0",
        "red/mquake/f0",
        "red_half/clutrr/f0",
        "lofit/clutrr/f0/k0.03/random",
        "lofit/truthfulqa/f0/k0.03/mquake",
        "select/clutrr/f0/s12450",
        "ood/lora",
    ):
        assert unit in units and "error" not in units[unit], unit
    for unit in ("repe/truthfulqa/f0", "repe/clutrr/f0", "loreft/mquake/f0", "loreft/clutrr/f0"):
        assert unit in units and "test" in units[unit], unit
    assert (
        units["repe/truthfulqa/f0"]["vector"] == "reading" and units["repe/mquake/f0"]["vector"] == "contrast"
    )
    assert units["loreft/mquake/f0"]["trainable_params"] > 0 and "loreft/truthfulqa/f0" not in units
    for unit in (
        "lofit/mquake/f0/k0.03/bias",
        "lofit/clutrr/f0/k0.03/probe_layers",
        "bias_select/truthfulqa/f0",
    ):
        assert unit in units and "error" not in units[unit], unit
    assert (
        units["lora/truthfulqa/f0"]["trainable_params"]
        > units["lofit/truthfulqa/f0/k0.1/lofit"]["trainable_params"]
    )
    # RED(Half) on the tiny model's 3 layers: the upper half is layers 1 and 2
    assert (
        units["red_half/mquake/f0"]["trainable_params"] * 3 == units["red/mquake/f0"]["trainable_params"] * 2
    )
    # bias-based selection trains every head at lrs below the tuned 10% one (that lr itself diverged)
    top = units["lofit/truthfulqa/f0/k0.1/lofit"]["lr"]
    searched = [entry["lr"] for entry in units["bias_select/truthfulqa/f0"]["all_heads"]["search"]]
    assert searched == pytest.approx([top / 25, top / 5, top])
    assert units["bias_select/truthfulqa/f0"]["lr"] in searched
    bias_row = [entry["lr"] for entry in units["lofit/truthfulqa/f0/k0.03/bias"]["search"]]
    assert bias_row == pytest.approx([top / 25, top / 5, top])  # the row searches too (see unit_lofit)
    for search in ("bias_select/truthfulqa/f0", "lofit/truthfulqa/f0/k0.03/bias"):  # each lr committed
        assert all(script.lr_unit(search, lr) in units for lr in bias_row)
    # Table 1's second seed: seed 12450's own heads and training, at seed 42's lr
    second, first = units["lofit/clutrr/f0/k0.1/lofit_s12450"], units["lofit/clutrr/f0/k0.1/lofit"]
    selected = units["select/clutrr/f0/s12450"]["ranking"][: second["k"]]
    assert second["seed"] == 12450 and second["lr"] == first["lr"] and len(second["search"]) == 1
    assert sorted((int(layer), head) for layer, heads in second["heads"].items() for head in heads) == sorted(
        tuple(x) for x in selected
    )
    text = (out / "paper_tables_quick.md").read_text()
    assert "| LoFiT 3%, seed 12450 |" in text
    mean_row = next(line for line in text.splitlines() if line.startswith("| LoFiT 10%, mean of seeds"))
    clutrr_mean = 100 * (first["test"]["exact_match"] + second["test"]["exact_match"]) / 2
    assert mean_row.split("|")[-2].strip() == f"{clutrr_mean:.1f}"  # the last column is CLUTRR EM
    for title in ("Table 1", "Table 2", "Table 3", "Stability", "Out-of-domain", "Hyperparameter choices"):
        assert title in text
    lens = units["lofit/mquake/f0/k0.1/lofit"]["logit_lens"]  # App. E: every offset's top tokens
    assert len(lens) == units["lofit/mquake/f0/k0.1/lofit"]["k"] and all(len(e["tokens"]) == 8 for e in lens)
    assert "## Logit lens of the learned offsets" in text and "`lofit/mquake/f0/k0.1/lofit`:" in text
    assert "not run (budget)" not in text
    assert (out / "heatmaps_quick" / "truthfulqa.png").is_file()
    # resumable: a second run finds every unit cached and changes none of them
    assert script.main(argv) == 0
    again = json.loads((out / "paper_tables_quick.json").read_text())["units"]
    assert again == units
    # a fresh checkout has no work dir: the OOD units rebuild their TruthfulQA adapters from the cached
    # units and score exactly what the first run scored (training is deterministic on one machine)
    results = json.loads((out / "paper_tables_quick.json").read_text())
    ood = {unit: results["units"].pop(unit) for unit in list(results["units"]) if unit.startswith("ood/")}
    (out / "paper_tables_quick.json").write_text(json.dumps(results))
    for adapter in (out / ".paper_tables_quick_work").glob("*.pt"):
        adapter.unlink()
    assert script.main([*argv, "--stages", "ood"]) == 0
    rebuilt = json.loads((out / "paper_tables_quick.json").read_text())["units"]
    for method in ("iti", "lofit", "lora"):
        unit = rebuilt[f"ood/{method}"]
        assert unit["rebuilt"] is True and unit["test"] == ood[f"ood/{method}"]["test"], method
    assert rebuilt["ood/iti"]["same_heads"] is True
    for method in ("lofit", "lora"):
        assert rebuilt[f"ood/{method}"]["rebuilt_val_loss"] == pytest.approx(
            rebuilt[f"ood/{method}"]["unit_val_loss"]
        )


@pytest.mark.skipif(not (DATA / "truthfulqa").is_dir(), reason="benchmark data not available")
def test_budget_zero_runs_nothing_and_marks_cells(tmp_path: Path, tiny_model_dir: Path) -> None:
    script = load_script()
    out = tmp_path / "out"
    argv = ["--quick", "--model", str(tiny_model_dir), "--out", str(out), "--budget-minutes", "0"]
    assert script.main(argv) == 0
    assert json.loads((out / "paper_tables_quick.json").read_text())["units"] == {}
    assert "not run (budget)" in (out / "paper_tables_quick.md").read_text()


def test_plan_runs_the_main_comparison_first(tmp_path: Path) -> None:
    """Under a budget, LoFiT 10% and LoRA finish before LoFiT 3%, ITI and RED; fold 1 comes last."""
    script = load_script()
    harness = script.Harness(script.Settings(), tmp_path / "r.json", tmp_path, float("inf"))
    tasks = ["truthfulqa", "mquake"]
    units = [unit for unit, _ in script.plan(harness, tasks, [0, 1], ["table1", "table3"])]
    first = {
        prefix: min(i for i, u in enumerate(units) if u.startswith(prefix))
        for prefix in (
            "zero_shot",
            "select",
            "lofit/truthfulqa/f0/k0.1/",
            "lora",
            "lofit/truthfulqa/f0/k0.03/",
            "iti",
            "red",
        )
    }
    assert list(first.values()) == sorted(first.values())
    assert max(i for i, u in enumerate(units) if u.startswith("lofit/mquake/f0/k0.1/")) < first["lora"]
    assert units[-1].startswith("iti/truthfulqa/f1") and not any("mquake/f1" in u for u in units)
    only3 = [unit for unit, _ in script.plan(harness, tasks, [0], ["table3"])]
    assert only3 == [
        *("lora/truthfulqa/f0", "lora/mquake/f0", "red/truthfulqa/f0", "red/mquake/f0"),
        *("red_half/truthfulqa/f0", "red_half/mquake/f0"),
    ]
    # Table 2: every row by default (another task's heads only where they can be had); or some rows
    table2 = [unit for unit, _ in script.plan(harness, ["clutrr"], [0], ["table2"])]
    assert table2 == [
        f"lofit/clutrr/f0/k0.03/{r}" for r in ("lofit", "random", "probe", "probe_layers", "bias")
    ]
    with_other = [unit for unit, _ in script.plan(harness, tasks, [0], ["table2"], ["other", "bias"])]
    # (CLUTRR, MQuAKE's other task, is neither in the run nor cached: no such row)
    assert with_other == [
        *("lofit/truthfulqa/f0/k0.03/mquake", "lofit/truthfulqa/f0/k0.03/bias", "lofit/mquake/f0/k0.03/bias")
    ]


def test_render_only_keeps_units_of_other_settings(tmp_path: Path) -> None:
    """--render-only renders the file as stored, even when its settings differ from the command line's."""
    from dataclasses import asdict

    script = load_script()
    settings = asdict(script.Settings(max_train=0, max_test=0, epochs=5))
    unit = {"method": "0-shot", "test": {"mc1": 0.25, "mc2": 0.5}, "trainable_params": 0, "wall_s": 1.0}
    results = {"settings": settings, "units": {"zero_shot/truthfulqa/f0": unit}, "runs": []}
    (tmp_path / "paper_tables.json").write_text(json.dumps(results))
    before = (tmp_path / "paper_tables.json").read_text()
    assert script.main(["--render-only", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "paper_tables.md").read_text()
    assert "| 0-shot | 25.0 (fold 0) | 50.0 (fold 0) |" in text
    assert "training records per task: all (the whole split)" in text
    assert (tmp_path / "paper_tables.json").read_text() == before
    with pytest.raises(SystemExit, match="no results file"):
        script.main(["--render-only", "--out", str(tmp_path / "empty")])


def test_final_only_validation_equals_the_trainers_last_epoch_loss(tiny_model_dir: Path) -> None:
    """validate="final" computes the same loss the trainer reports after its last epoch (same model)."""
    script = load_script()
    losses = {}
    for mode in (None, "final"):
        settings = script.Settings(
            model=str(tiny_model_dir), max_train=8, max_val=4, epochs=2, precision="fp32"
        )
        settings.validate = mode
        harness = script.Harness(settings, tiny_model_dir / f"r{mode}.json", tiny_model_dir, float("inf"))
        harness.tasks["mquake0"] = fake_task()
        heads = {0: [1], 1: [0]}
        _, result = script.train_lofit(harness, "mquake", 0, heads, [1e-2])
        losses[mode] = result["search"][0]["val_loss"]
    assert losses["final"] == pytest.approx(losses[None], rel=1e-5)


def fake_task():  # type: ignore[no-untyped-def]
    from lofit.tasks.task import Task

    train = [{"prompt": f"Q: {c}? A:", "completion": f" {c}{c}"} for c in "abcdefgh"]
    evals = [{"prompt": f"Q: {c}? A:", "answers": [f" {c}{c}"]} for c in "abcd"]
    return Task(
        "mquake", "sft", "exact_match", train, train[:4], evals, evals, "mquake", defaults={"l1": 1e-3}
    )


def load_curves():  # type: ignore[no-untyped-def]
    from benchmarks.curves import run

    return run


def quick_curves_argv(model_dir: Path, out: Path, task: str, options: str) -> list[str]:
    """`python -m benchmarks.curves --quick` on `model_dir` and `task`, writing to `out`, plus the space-separated `options`."""
    return ["--quick", "--model", str(model_dir), "--out", str(out), "--tasks", task, *options.split()]


def test_curves_subsets_are_nested_and_seeded() -> None:
    curves = load_curves()
    records = list(range(50))
    small, large = curves.nested_subset(records, 8, 42), curves.nested_subset(records, 20, 42)
    assert large[:8] == small and len(set(large)) == 20
    assert curves.nested_subset(records, 8, 12450) != small
    assert sorted(curves.nested_subset(records, 80, 42)) == records  # n above the split: all of it


@pytest.mark.skipif(not (DATA / "mquake").is_dir(), reason="benchmark data not available")
def test_curves_quick_run_writes_unit_files_and_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    curves = load_curves()
    out = tmp_path / "curves"
    argv = quick_curves_argv(
        tiny_model_dir, out, "mquake", "--sizes 4 8 --seeds 1 2 --methods lofit lora --stages fig4 fig5"
    )
    argv += ["--fractions", "0.1", "1.0"]
    assert curves.main(argv) == 0
    files = sorted(p.name for p in (out / "units").glob("*.json"))
    # Fig. 5 runs at the largest n asked for: 8 is not MQuAKE's whole split, so its units name it.
    assert "fig4__mquake__n4__s1__lofit.json" in files and "fig5__mquake__n8__k1__s2.json" in files
    unit = json.loads((out / "units" / "fig4__mquake__n8__s2__lora.json").read_text())
    assert unit["n"] == 8 and unit["seed"] == 2 and "exact_match" in unit["test"]
    lofit = json.loads((out / "units" / "fig4__mquake__n4__s1__lofit.json").read_text())
    assert lofit["heads_from"] == "fig4/mquake/n4/s1/select" and lofit["search"][0]["val_loss"] > 0
    # Fig. 5 reuses Fig. 4's 10% lr, except at K = 100%, which searches its own below it.
    fig4_lr = json.loads((out / "units" / "fig4__mquake__n8__s2__lofit.json").read_text())["lr"]
    ten, all_heads = (
        json.loads((out / "units" / f"fig5__mquake__n8__k{k}__s2.json").read_text()) for k in ("0.1", "1")
    )
    assert [entry["lr"] for entry in ten["search"]] == [fig4_lr]
    assert [entry["lr"] for entry in all_heads["search"]] == pytest.approx(
        [fig4_lr / 25, fig4_lr / 5, fig4_lr]
    )
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "units").glob("*.json")}
    assert curves.main(argv) == 0  # resumes: nothing reruns, no file is rewritten
    assert {p.name: p.stat().st_mtime_ns for p in (out / "units").glob("*.json")} == stamps
    text = (out / "curves.md").read_text()
    assert "### MQuAKE" in text and "| 4 |" in text and "## Fig. 5" in text and (out / "fig4.png").is_file()
    # A second size gets its own units and its own column, with Fig. 4's selection and lr at that n; the
    # whole split (any n at or above its size) keeps the paper's unit names.
    settings = curves.build_settings(curves.parse_args(argv))
    harness = curves.CurveHarness(settings, out / "units", tmp_path / "work", float("inf"), False)
    plan = curves.fig5_plan(harness, ["mquake"], [10_000], [1], [0.1])
    assert [unit for unit, _ in plan] == ["fig4/mquake/n134/s1/select", "fig5/mquake/k0.1/s1"]
    small = quick_curves_argv(tiny_model_dir, out, "mquake", "--sizes 4 --seeds 1 --stages fig5")
    assert curves.main([*small, "--fractions", "0.1"]) == 0
    at_four = json.loads((out / "units" / "fig5__mquake__n4__k0.1__s1.json").read_text())
    fig4_four = json.loads((out / "units" / "fig4__mquake__n4__s1__lofit.json").read_text())
    assert at_four["n"] == 4 and at_four["heads_from"] == "fig4/mquake/n4/s1/select"
    assert [entry["lr"] for entry in at_four["search"]] == [fig4_four["lr"]]
    assert {
        p.name: p.stat().st_mtime_ns for p in (out / "units").glob("*.json") if p.name in stamps
    } == stamps
    text = (out / "curves.md").read_text()
    assert "MQuAKE exact_match (n = 4)" in text and "MQuAKE exact_match (n = 8)" in text


def test_two_runs_on_one_results_file_keep_each_others_units(tmp_path: Path) -> None:
    """Two paper_tables runs on the same `--out` (each started before the other saved): every save takes
    in what the other wrote, so neither drops the other's units or its run record."""
    script = load_script()
    path = tmp_path / "paper_tables.json"
    settings = script.Settings()
    first, second = (script.Harness(settings, path, tmp_path, float("inf")) for _ in range(2))
    for harness, unit in ((first, "zero_shot/mquake/f0"), (second, "zero_shot/clutrr/f0")):
        harness.results["runs"].append({"command": f"run {unit}", "started": unit})
    first.run("zero_shot/mquake/f0", lambda: {"test": {"exact_match": 0.25}})
    second.run("zero_shot/clutrr/f0", lambda: {"test": {"exact_match": 0.5}})
    first.run("select/mquake/f0/s42", lambda: {"scores": [[1.0]], "ranking": [[0, 0]]})
    stored = json.loads(path.read_text())
    assert set(stored["units"]) == {"zero_shot/mquake/f0", "zero_shot/clutrr/f0", "select/mquake/f0/s42"}
    assert stored["units"]["zero_shot/clutrr/f0"]["test"] == {"exact_match": 0.5}
    assert [run["command"] for run in stored["runs"]] == [
        "run zero_shot/clutrr/f0",
        "run zero_shot/mquake/f0",
    ]
    # a run of other settings on the same file sets the units aside and loses none of them
    other = script.Harness(script.Settings(max_test=7), path, tmp_path, float("inf"))
    other.run("zero_shot/mquake/f0", lambda: {"test": {"exact_match": 0.75}})
    stored = json.loads(path.read_text())
    assert stored["units"]["zero_shot/mquake/f0"]["test"] == {"exact_match": 0.75}
    assert {unit for unit, _ in stored["superseded"].values()} == {
        "zero_shot/mquake/f0",
        "zero_shot/clutrr/f0",
    }
    assert "select/mquake/f0/s42" in stored["units"]  # the test-set size is not one of its settings
    assert not (tmp_path / ".paper_tables.json.lofit-lock").exists()  # the lock is released


def test_probe_layer_heads_take_whole_layers_by_mean_probe_accuracy(tmp_path: Path) -> None:
    script = load_script()
    harness = script.Harness(script.Settings(), tmp_path / "r.json", tmp_path, float("inf"))
    scores = [[0.5, 0.6, 0.7, 0.2], [0.9, 0.9, 0.8, 0.8], [0.6, 0.9, 0.5, 0.4]]  # layer means .5 .85 .6
    ranking = sorted(((a, b) for a in range(3) for b in range(4)), key=lambda x: -scores[x[0]][x[1]])
    harness.results["units"]["iti/mquake/f0"] = {"probe_scores": scores, "probe_ranking": ranking}
    # K = 50% of 12 heads = 6: all of layer 1 (best mean), then layer 2's two best-probed heads (1, 0).
    assert script.heads_for(harness, "mquake", 0, "probe_layers", 0.5) == {1: [0, 1, 2, 3], 2: [0, 1]}


def test_curves_commit_a_unit_given_a_relative_path(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The run commits each finished unit; `--out` relative to the working directory must work too."""
    import subprocess

    from benchmarks.harness.commits import commit_path

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    for key, value in (("user.name", "t"), ("user.email", "t@example.com")):
        subprocess.run(["git", "-C", str(tmp_path), "config", key, value], check=True)
    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "a.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert commit_path(Path("units/a.json"), "unit a")
    log = subprocess.run(["git", "-C", str(tmp_path), "log", "--name-only", "--format=%s"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert "unit a" in log and "units/a.json" in log


def test_curves_run_writes_back_no_unit_it_only_read(tmp_path: Path) -> None:
    """A unit file removed on purpose (so that its unit reruns) is not written back by a run that had read
    it before; the units that run finishes are written, and a later run reads both."""
    curves = load_curves()
    settings = curves.Settings(**{**curves.CURVE_DEFAULTS, "max_train": 0})

    def harness():  # type: ignore[no-untyped-def]
        return curves.CurveHarness(settings, tmp_path / "units", tmp_path / "work", float("inf"), False)

    first = harness()
    for unit in ("fig5/mquake/k1/s42", "fig5/mquake/k0.5/s42"):
        first.results["units"][unit] = {"test": {"exact_match": 1.0}, "settings_key": settings.key(unit)}
    first.save()
    running = harness()  # a long run reads both files at its start
    assert set(running.results["units"]) == {"fig5/mquake/k1/s42", "fig5/mquake/k0.5/s42"}
    (tmp_path / "units" / "fig5__mquake__k1__s42.json").unlink()  # meanwhile: rerun this one
    unit = "fig5/mquake/k0.2/s42"
    running.results["units"][unit] = {"test": {"exact_match": 2.0}, "settings_key": settings.key(unit)}
    running.save()
    names = sorted(p.name for p in (tmp_path / "units").glob("*.json"))
    assert names == ["fig5__mquake__k0.2__s42.json", "fig5__mquake__k0.5__s42.json"]
    assert set(harness().results["units"]) == {"fig5/mquake/k0.2/s42", "fig5/mquake/k0.5/s42"}


@pytest.mark.skipif(not (DATA / "svamp").is_dir(), reason="benchmark data not available")
def test_curves_run_repe_loreft_on_svamp_and_render_the_whole_split_table(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    curves = load_curves()
    out = tmp_path / "curves"
    argv = quick_curves_argv(
        tiny_model_dir, out, "svamp", "--sizes 4 350 --seeds 1 --methods lofit repe iti loreft zero_shot"
    )
    assert curves.main(argv) == 0
    files = sorted(p.name for p in (out / "units").glob("*.json"))
    assert {"fig4__svamp__n350__s1__repe.json", "fig4__svamp__n4__s1__loreft.json"} <= set(files)
    repe = json.loads((out / "units" / "fig4__svamp__n350__s1__repe.json").read_text())
    assert repe["method"] == "RepE" and repe["vector"] == "contrast" and "exact_match" in repe["test"]
    loreft = json.loads((out / "units" / "fig4__svamp__n4__s1__loreft.json").read_text())
    assert loreft["method"] == "LoReFT" and loreft["n"] == 4 and loreft["trainable_params"] > 0
    text = (out / "curves.md").read_text()
    whole = text.split("## Tables 1 and 3 on this harness")[1].split("\n## ")[0]
    assert "SVAMP exact_match (n = 350)" in whole
    assert all(f"| {row}" in whole for row in ("RepE |", "ITI |", "LoReFT |", "LoFiT 10% |", "0-shot"))
    assert "| 4 |" not in whole  # only the whole-split units belong to that table


def test_curves_refuse_loreft_on_truthfulqa_by_leaving_it_out(tmp_path: Path) -> None:
    curves = load_curves()
    harness = curves.CurveHarness(
        curves.build_settings(curves.parse_args(["--quick"])), tmp_path / "units", tmp_path, 0.0, False
    )
    steps = curves.method_steps(harness, "truthfulqa", 8, 1, "loreft")
    assert steps == [] and [u for u, _ in curves.method_steps(harness, "mquake", 8, 1, "loreft")] == [
        "fig4/mquake/n8/s1/loreft"
    ]


def test_a_run_with_new_settings_keeps_the_units_of_the_old_ones(tmp_path: Path) -> None:
    """Changing a setting (e.g. --precision) must not delete finished units from the results file."""
    script = load_script()
    old, new = script.Settings(precision="bf16"), script.Settings(precision="fp32")
    unit = {"method": "0-shot", "test": {"exact_match": 0.5}, "settings_key": old.key("zero_shot/mquake/f0")}
    path = tmp_path / "paper_tables.json"
    path.write_text(json.dumps({"settings": {}, "units": {"zero_shot/mquake/f0": unit}, "runs": []}))
    harness = script.Harness(new, path, tmp_path, float("inf"))
    assert not harness.done("zero_shot/mquake/f0")  # not a cache hit for the new settings
    harness.save()
    assert "zero_shot/mquake/f0" in path.read_text()  # ... but still in the file
    again = script.Harness(old, path, tmp_path, float("inf"))
    assert again.get("zero_shot/mquake/f0")["test"] == {"exact_match": 0.5}


def test_curves_refuse_a_learning_rate_grid_that_is_not_positive(capsys: pytest.CaptureFixture[str]) -> None:
    curves = load_curves()
    with pytest.raises(SystemExit) as exit_info:
        curves.parse_args(["--lofit-lrs", "0.05", "-0.1"])
    assert exit_info.value.code == 2 and "--lofit-lrs must be positive" in capsys.readouterr().err


@pytest.mark.skipif(not (DATA / "mquake").is_dir(), reason="benchmark data not available")
def test_a_heads_from_run_trains_table2_on_the_other_files_heads(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`--precision fp32 --heads-from FILE`: Table 2 trained in another precision on the heads (and the tuned
    lr) that FILE's run chose, which it never recomputes; other data settings or missing heads are refused."""
    script = load_script()
    common = ["--quick", "--model", str(tiny_model_dir), "--folds", "0", "--max-train", "4", "--max-val", "2"]
    common += ["--max-test", "2"]
    first = tmp_path / "bf16"
    assert (
        script.main([*common, "--out", str(first), "--stages", "table1", "--tasks", "mquake", "clutrr"]) == 0
    )
    theirs = json.loads((first / "paper_tables_quick.json").read_text())["units"]
    source = first / "paper_tables_quick.json"
    second = tmp_path / "fp32"
    argv = [*common, "--out", str(second), "--precision", "fp32", "--heads-from", str(source)]
    assert script.main([*argv, "--stages", "table2", "--tasks", "mquake"]) == 0
    results = json.loads((second / "paper_tables_quick.json").read_text())
    units = results["units"]
    assert results["settings"]["heads_from"] == str(source) and results["settings"]["precision"] == "fp32"
    assert not [u for u in units if u.startswith(("select/", "iti/", "lofit/mquake/f0/k0.1/"))]
    rows = {
        source_name: units[f"lofit/mquake/f0/k0.03/{source_name}"]
        for source_name in ("lofit", "random", "probe", "clutrr", "probe_layers", "bias")
    }

    def heads(unit: dict) -> list[tuple[int, int]]:  # type: ignore[type-arg]
        return sorted((int(layer), head) for layer, hs in unit["heads"].items() for head in hs)

    k = rows["lofit"]["k"]
    assert heads(rows["lofit"]) == sorted(tuple(x) for x in theirs["select/mquake/f0/s42"]["ranking"][:k])
    assert heads(rows["clutrr"]) == sorted(tuple(x) for x in theirs["select/clutrr/f0/s42"]["ranking"][:k])
    assert heads(rows["probe"]) == sorted(tuple(x) for x in theirs["iti/mquake/f0"]["probe_ranking"][:k])
    tuned = theirs["lofit/mquake/f0/k0.1/lofit"]["lr"]
    assert rows["lofit"]["lr"] == tuned and [e["lr"] for e in rows["lofit"]["search"]] == [tuned]
    assert [e["lr"] for e in units["bias_select/mquake/f0"]["all_heads"]["search"]] == pytest.approx(
        [tuned / 25, tuned / 5, tuned]
    )
    # the heads were chosen on other data: refused, with what to change
    with pytest.raises(SystemExit, match="max_train 4 there, 3 here"):
        script.main([*argv, "--max-train", "3", "--stages", "table2", "--tasks", "mquake"])
    # heads the other file does not have are never computed here
    with pytest.raises(RuntimeError, match="select/truthfulqa/f0/s42 is not in"):
        script.main([*argv, "--stages", "table2", "--tasks", "truthfulqa"])
    with pytest.raises(SystemExit, match="no results file"):
        script.main([*common, "--out", str(second), "--heads-from", str(tmp_path / "missing.json")])


def test_a_chunked_lr_search_equals_the_plain_search_and_resumes_lr_by_lr(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each lr of a search is its own committed unit; the chosen lr's offsets, loaded into a fresh model,
    give the same test metrics as the model the plain search kept (same trainings, same seeds)."""
    script = load_script()
    settings = script.Settings(model=str(tiny_model_dir), max_train=8, max_val=4, epochs=2, precision="fp32")
    heads, lrs, unit = {0: [1], 1: [0]}, [1e-3, 5e-2, 1e-2], "lofit/mquake/f0/k0.03/bias"
    plain = script.Harness(settings, tiny_model_dir / "plain.json", tiny_model_dir, float("inf"))
    plain.tasks["mquake0"] = fake_task()
    kept, expected = script.train_lofit(plain, "mquake", 0, heads, lrs)
    path = tiny_model_dir / "chunked.json"
    chunked = script.Harness(settings, path, tiny_model_dir / "work", float("inf"))
    chunked.tasks["mquake0"] = fake_task()
    _, result = script.train_lofit(chunked, "mquake", 0, heads, lrs, unit=unit)
    assert [e["lr"] for e in result["search"]] == lrs
    assert [e["val_loss"] for e in result["search"]] == pytest.approx(
        [e["val_loss"] for e in expected["search"]]
    )
    assert result["lr"] == expected["lr"]
    assert result["test"] == pytest.approx(expected["test"])
    assert result["logit_lens"] == expected["logit_lens"]
    # the committed offsets are exactly the trained ones
    stored = json.loads(path.read_text())["units"][script.lr_unit(unit, expected["lr"])]
    state, trained = script.decode_state(stored["state"]), script.trained_state(kept)
    assert set(state) == set(trained) and all(torch.equal(state[n], trained[n]) for n in trained)
    # a later run on the same file trains nothing: every lr is a cached unit
    from benchmarks.paper import units

    monkeypatch.setattr(units, "fit_lofit", lambda *a, **k: pytest.fail("a cached lr was trained again"))
    again = script.Harness(settings, path, tiny_model_dir / "work", float("inf"))
    again.tasks["mquake0"] = fake_task()
    _, resumed = script.train_lofit(again, "mquake", 0, heads, lrs, unit=unit)
    assert resumed["test"] == pytest.approx(expected["test"])


def test_a_unit_claimed_by_a_live_run_is_skipped_and_a_dead_runs_claim_is_taken(tmp_path: Path) -> None:
    """Two runs of one command split a chunked search: a claimed lr is left to its holder (the search
    waits, naming it), and the claim of a killed run is taken over."""
    import socket
    import subprocess

    script = load_script()
    harness = script.Harness(script.Settings(), tmp_path / "r.json", tmp_path / "work", float("inf"))
    unit = script.lr_unit("bias_select/mquake/f0", 0.01)
    claim = tmp_path / "work" / "claims" / (unit.replace("/", "+") + ".claim")
    claim.parent.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claim.write_text(f"pid {sleeper.pid} on {socket.gethostname()}")
        ran: list[str] = []
        assert harness.run(unit, lambda: ran.append(unit) or {"val_loss": 1.0}, claim=True) is None
        assert ran == [] and harness.held_elsewhere[unit] == f"pid {sleeper.pid} on {socket.gethostname()}"
        trial = {"lr": 0.01, "val_loss": 1.0, "train_s": 1.0, "state": ""}
        with pytest.raises(script.BudgetSpent, match=f"run by pid {sleeper.pid}"):
            harness.tasks["mquake0"] = fake_task()
            script.chunked_lr_search(harness, "bias_select/mquake/f0", "mquake", 0, {0: [0]}, [0.01])
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone: its claim is stale, this run takes the unit and releases the claim after it
    assert harness.run(unit, lambda: dict(trial), claim=True) is not None
    assert unit in harness.results["units"] and not claim.exists()


@pytest.mark.parametrize(
    "content", [b"not json", b"\xff\xfe", b"[1, 2]", b'{"units": {}}', b'{"settings": {"x": 1}}']
)
def test_heads_from_a_file_that_is_no_results_file_is_refused_and_left_alone(
    tmp_path: Path, content: bytes
) -> None:
    script = load_script()
    source = tmp_path / "heads.json"
    source.write_bytes(content)
    settings = script.Settings(heads_from=str(source))
    with pytest.raises(SystemExit, match="not a paper_tables results file"):
        script.Harness(settings, tmp_path / "r.json", tmp_path, float("inf"))
    assert source.read_bytes() == content


def test_ood_rows_say_which_adapters_were_rebuilt_and_how_close_they_came() -> None:
    from benchmarks.paper.render import ood_rebuilds

    units = {
        "ood/base": {"method": "base", "test": {}},
        "ood/iti": {"rebuilt": True, "rebuilt_from": "iti/truthfulqa/f0", "same_heads": False},
        "ood/lofit": {"rebuilt": False},
        "ood/lora": {
            "rebuilt": True,
            "rebuilt_from": "lora/truthfulqa/f0",
            "unit_val_loss": 0.5123,
            "rebuilt_val_loss": 0.6389,
        },
    }
    lines = ood_rebuilds(units)
    assert (
        lines[0]
        == "- iti: rebuilt from `iti/truthfulqa/f0` on this run's machine (the refitted probes chose other heads)."
    )
    assert "0.6389 vs the unit's 0.5123" in lines[1] and lines[1].startswith("- lora:")
    assert len(lines) == 3 and lines[2] == ""  # lofit's own file was used: no line
    assert ood_rebuilds({}) == []


def test_check_ood_adapters_refuses_a_work_dir_without_the_adapter_and_writes_nothing(tmp_path: Path) -> None:
    script = load_script()
    from benchmarks.paper import check_ood as check

    results = tmp_path / "results"
    results.mkdir()
    settings = script.Settings()
    stored = {"settings": dataclasses.asdict(settings), "units": {}, "runs": []}
    (results / "paper_tables.json").write_text(json.dumps(stored), encoding="utf-8")
    before = (results / "paper_tables.json").read_bytes()
    with pytest.raises(SystemExit, match=r"run `python -m benchmarks\.paper --stages ood`"):
        check.main(["--results", str(results), "--work-dir", str(tmp_path / "empty"), "--methods", "lora"])
    assert (results / "paper_tables.json").read_bytes() == before
