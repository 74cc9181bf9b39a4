"""Cheap head selection vs LoFiT's L1 selection on the bundled model.

For TruthfulQA (DPO, fold 0), MQuAKE and CLUTRR (SFT) on a seeded subset of the training split:
- selectors: "lofit" (step 1: L1-regularised scales, `--select-epochs` epochs), "gradient" (one pass,
  ‖∂L/∂A‖₂ at A = 0), "fisher" (the mean per-batch ‖g_b‖² from the same pass, no extra cost), "adam"
  (from the same pass: ‖max(0, |ḡ| − λ) / √mean_b m_b²‖, the rate at which step 1's Adam + L1 would move
  each scale element; `lofit.selection.gradient`) and "random" (seed 42, a floor);
- cost of each selector: process CPU time (primary clock: the run is single-threaded and the machine is
  shared, so wall time includes other processes' turns) and wall time;
- Jaccard overlap of each selector's top 3% / 10% with L1's;
- step 2 (offsets on each selector's top `--k`, same lr / epochs / seed for all) and test accuracy with
  standard errors; also the paired difference to L1's heads on the same test records with its SE.

Results go to OUT/selectors.json (every unit, resumable) and OUT/selectors.md; with `--commit` each
finished unit is committed (`git commit` of OUT) as it lands.

    OMP_NUM_THREADS=1 nice -n 5 python -m benchmarks.selector_comparison --commit
    python -m benchmarks.selector_comparison --model DIR --tasks truthfulqa --max-train 8 --max-test 4 \
        --select-epochs 1 --train-epochs 1 --max-length 96 --out DIR      # smoke test

"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lofit import evaluate, load_model, select_heads, train_offsets
from lofit.selection import HeadSelection
from lofit.tasks import load_task

from . import RESULTS
from .harness.commits import commit_path
from .harness.environment import environment
from .harness.internals import atomic_write_json, atomic_write_text, rank_heads
from .harness.stats import jaccard, mean_se, sample

TASKS = ("truthfulqa", "mquake", "clutrr")
# Step-2 learning rates chosen on the validation split by benchmarks.paper (128 training
# records, 3 epochs; benchmarks/results/paper_tables.json, units lofit/<task>/f0/k0.1/lofit), used here
# unchanged for every selector: nothing is tuned on this comparison's test records.
STEP2_LR = {"truthfulqa": 1e-2, "mquake": 5e-2, "clutrr": 5e-2}
SELECTORS = ("lofit", "gradient", "fisher", "adam", "random")
# Selectors whose scores come free with the gradient pass: their metadata key.
DERIVED = {"fisher": "fisher_scores", "adam": "adam_scores"}


class Bench:
    """Tasks, the base model, the results file and the units."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.path = args.out / "selectors.json"
        self.results: dict[str, Any] = (
            json.loads(self.path.read_text()) if self.path.is_file() else {"units": {}, "runs": []}
        )
        self.settings = {
            "max_train": args.max_train,
            "max_test": args.max_test,
            "select_epochs": args.select_epochs,
            "train_epochs": args.train_epochs,
            "k": args.k,
            "precision": args.precision,
            "batch_size": 8,
            "seed": 42,
            "step2_lr": STEP2_LR,
            "sample_seed": 0,
        }
        if args.max_length is not None:  # absent by default: the committed run's settings stay equal
            self.settings["max_length"] = args.max_length
        if self.results.get("settings") not in (None, self.settings):
            raise SystemExit(f"{self.path} holds results of other settings; pass another --out")
        self.results["settings"] = self.settings
        self.tasks: dict[str, Any] = {}
        self.model, self.tokenizer = load_model(args.model)

    def task(self, name: str) -> Any:
        if name not in self.tasks:
            self.tasks[name] = load_task(name, fold=0)
        return self.tasks[name]

    def split(self, name: str, split: str) -> list[Any]:
        limit = self.args.max_train if split == "train" else self.args.max_test
        return sample(getattr(self.task(name), split), limit, seed=0)

    def save(self) -> None:
        atomic_write_json(self.path, self.results)
        atomic_write_text(self.args.out / "selectors.md", render(self.results))

    def run(self, unit: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if unit in self.results["units"]:
            return dict(self.results["units"][unit])
        print(f"[selectors] {unit} ...", flush=True)
        cpu, wall = time.process_time(), time.perf_counter()
        result = fn()
        result["unit_cpu_s"] = round(time.process_time() - cpu, 1)
        result["unit_wall_s"] = round(time.perf_counter() - wall, 1)
        result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.results["units"][unit] = result
        self.save()
        print(
            f"[selectors] done {unit}: cpu {result['unit_cpu_s']} s, wall {result['unit_wall_s']} s",
            flush=True,
        )
        if self.args.commit:
            commit_path(self.args.out, f"benchmarks/selectors: {unit}")
        return result


def unit_select(bench: Bench, name: str, method: str) -> dict[str, Any]:
    task = bench.task(name)
    options: dict[str, Any] = {
        "batch_size": 8,
        "seed": 42,
        "precision": bench.args.precision,
        "progress": False,
        **length_option(bench),
    }
    if method == "lofit":
        options.update(
            epochs=bench.args.select_epochs,
            lr=float(task.defaults["lr_select"]),
            l1=float(task.defaults["l1"]),
        )
    if method == "gradient":  # the "adam" score subtracts step 1's λ
        options.update(l1=float(task.defaults["l1"]))
    cpu, wall = time.process_time(), time.perf_counter()
    selection = select_heads(
        bench.model,
        bench.tokenizer,
        bench.split(name, "train"),
        method=method,
        objective=task.objective,
        **options,
    )
    result = {
        "cpu_s": round(time.process_time() - cpu, 2),
        "wall_s": round(time.perf_counter() - wall, 2),
        "scores": selection.scores.tolist(),
        "ranking": [list(entry) for entry in selection.ranking],
        "options": options,
    }
    if method == "gradient":
        for key in DERIVED.values():
            result[key] = selection.metadata["gradient"][key]
    return result


def length_option(bench: Bench) -> dict[str, Any]:
    """`max_length` for selection and training, when `--max-length` is given."""
    return {} if bench.args.max_length is None else {"max_length": bench.args.max_length}


def selection_of(bench: Bench, name: str, selector: str) -> HeadSelection:
    units = bench.results["units"]
    scores = torch.tensor(_scores(units, name, selector))
    return HeadSelection(scores, _ranking(units, name, selector), selector)


def per_record(name: str, details: list[dict[str, Any]]) -> dict[str, list[float]]:
    if name == "truthfulqa":
        return {"mc1": [float(d["mc1"]) for d in details], "mc2": [float(d["mc2"]) for d in details]}
    return {"exact_match": [float(d["correct"]) for d in details]}


def unit_step2(bench: Bench, name: str, selector: str) -> dict[str, Any]:
    task = bench.task(name)
    heads = selection_of(bench, name, selector).top(bench.args.k)
    model = train_offsets(
        bench.model,
        bench.tokenizer,
        bench.split(name, "train"),
        heads=heads,
        objective=task.objective,
        epochs=bench.args.train_epochs,
        lr=STEP2_LR[name],
        batch_size=8,
        seed=42,
        precision=bench.args.precision,
        progress=False,
        **length_option(bench),
    )
    try:
        model.eval()
        kwargs: dict[str, Any] = {"batch_size": 8, "progress": False}
        if task.eval_task == "exact_match":
            kwargs.update(extraction=task.extraction, max_new_tokens=task.max_new_tokens)
        with torch.no_grad():
            metrics, details = evaluate(
                model,
                bench.tokenizer,
                task.eval_task,
                bench.split(name, "test"),
                return_details=True,
                **kwargs,
            )
    finally:
        model.unload()
    return {
        "heads": [[layer, head] for layer, hs in heads.items() for head in hs],
        "metrics": metrics,
        "per_record": per_record(name, details),
        "train_s": model.training_history.summary.get("elapsed_s"),
    }


# ------------------------------------------------------------------------------------- report
def _fmt_metric(values: list[float], reference: list[float] | None) -> str:
    mean, se = mean_se(values)
    text = f"{100 * mean:.1f} ± {100 * se:.1f}"
    if reference is not None:
        diff, diff_se = mean_se([a - b for a, b in zip(values, reference, strict=True)])
        text += f" (Δ {100 * diff:+.1f} ± {100 * diff_se:.1f})"
    return text


def render(results: dict[str, Any]) -> str:
    units, settings = results["units"], results["settings"]
    lines = ["# Cheap head selection vs L1 selection (smollm2-135m)", "", "## Runs", ""]
    for run in results["runs"]:
        lines.append(
            f"- `{run['command']}` started {run['started']}; {run['machine']}; torch threads "
            f"{run.get('torch_threads', run.get('cpu_threads'))}; python {run['python']}, torch {run['torch']}, transformers "
            f"{run['transformers']}, lofit {run['lofit']}; load average at start {run['load_average_at_start']}"
        )
    lines += [
        "",
        "## Settings",
        "",
        f"- {json.dumps(settings)}",
        "- L1 selection: the task's l1 and lr_select "
        "(lofit.tasks defaults), batch 8, seed 42; gradient: one pass, batch 8. Step 2: offsets on the "
        f"top {settings['k']} heads, the same lr/epochs/seed for every selector. Test records: a seeded "
        "sample, the same for every selector; ± is the standard error of the mean over test records, "
        "Δ the paired difference to L1's heads on the same records with its standard error.",
        "",
    ]
    lines += cost_table(units)
    lines += accuracy_table(units, settings["k"])
    notes = RESULTS / "selectors" / "selectors_notes.md"
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines) + "\n"


def cost_table(units: dict[str, Any]) -> list[str]:
    lines = [
        "## Cost and overlap with L1's heads",
        "",
        "| task | selector | CPU s | wall s | L1 CPU / this | Jaccard top 3% | Jaccard top 10% |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in TASKS:
        l1 = units.get(f"select/{name}/lofit")
        for selector in SELECTORS:
            source = _source(units, name, selector)
            if source is None:
                continue
            ratio = f"{l1['cpu_s'] / source['cpu_s']:.1f}×" if l1 and selector != "random" else "–"
            cpu = "(gradient's pass)" if selector in DERIVED else f"{source['cpu_s']:.1f}"
            overlaps = ["–", "–"]
            if l1 is not None:
                ranking, other = _ranking(units, name, "lofit"), _ranking(units, name, selector)
                counts = [max(1, math.floor(f * len(ranking) + 0.5)) for f in (0.03, 0.1)]
                overlaps = [f"{jaccard(ranking[:c], other[:c]):.2f}" for c in counts]
            lines.append(
                f"| {name} | {selector} | {cpu} | {source['wall_s']:.1f} | {ratio} | {overlaps[0]} | {overlaps[1]} |"
            )
    return lines


def accuracy_table(units: dict[str, Any], k: float) -> list[str]:
    lines = [
        "",
        f"## Step-2 test accuracy on each selector's top {k} heads (%)",
        "",
        "| task | metric | " + " | ".join(SELECTORS) + " |",
        "|---|---|" + "---|" * len(SELECTORS),
    ]
    for name in TASKS:
        base = units.get(f"step2/{name}/lofit")
        metrics = ("mc1", "mc2") if name == "truthfulqa" else ("exact_match",)
        for metric in metrics:
            cells = []
            for selector in SELECTORS:
                unit = units.get(f"step2/{name}/{selector}")
                if unit is None:
                    cells.append("–")
                    continue
                reference = base["per_record"][metric] if (base and selector != "lofit") else None
                cells.append(_fmt_metric(unit["per_record"][metric], reference))
            lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    return lines


def _source(units: dict[str, Any], name: str, selector: str) -> dict[str, Any] | None:
    return units.get(f"select/{name}/{'gradient' if selector in DERIVED else selector}")


def _scores(units: dict[str, Any], name: str, selector: str) -> list[list[float]]:
    source = _source(units, name, selector)
    assert source is not None, f"the {selector} selection of {name} is missing"
    return source[DERIVED.get(selector, "scores")]


def _ranking(units: dict[str, Any], name: str, selector: str) -> list[tuple[int, int]]:
    if selector in DERIVED:
        return rank_heads(torch.tensor(_scores(units, name, selector)))
    source = _source(units, name, selector)
    assert source is not None, f"the {selector} selection of {name} is missing"
    return [(int(e[0]), int(e[1])) for e in source["ranking"]]


# --------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=["mquake", "truthfulqa", "clutrr"], choices=TASKS)
    parser.add_argument("--max-train", type=int, default=128)
    parser.add_argument("--max-test", type=int, default=200)
    parser.add_argument("--select-epochs", type=int, default=5, help="epochs of L1 selection (paper: 5)")
    parser.add_argument("--train-epochs", type=int, default=3, help="epochs of step 2")
    parser.add_argument("--k", type=float, default=0.1, help="fraction of heads trained in step 2")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--max-length", type=int, default=None, help="truncate training sequences")
    parser.add_argument(
        "--step2", nargs="*", default=["lofit", "gradient", "random", "fisher", "adam"], choices=SELECTORS
    )
    parser.add_argument("--budget-minutes", type=float, default=None, help="start no unit after this")
    parser.add_argument("--commit", action="store_true", help="git-commit the results after each unit")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "selectors")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        atomic_write_text(
            args.out / "selectors.md", render(json.loads((args.out / "selectors.json").read_text()))
        )
        return 0
    torch.set_num_threads(1)
    deadline = time.time() + 60 * args.budget_minutes if args.budget_minutes else math.inf
    bench = Bench(args)
    command = "python -m benchmarks.selector_comparison " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    bench.results["runs"].append(
        {"command": command.strip(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), **environment()}
    )
    plan: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    for name in args.tasks:  # a gradient unit from before a derived score existed runs again (one pass)
        old = bench.results["units"].get(f"select/{name}/gradient")
        if old is not None and any(key not in old for key in DERIVED.values()):
            del bench.results["units"][f"select/{name}/gradient"]
    for name in args.tasks:  # task by task, in the order given: each finished task is a complete row
        for method in ("gradient", "lofit", "random"):
            plan.append((f"select/{name}/{method}", lambda n=name, m=method: unit_select(bench, n, m)))
        for selector in args.step2:
            plan.append((f"step2/{name}/{selector}", lambda n=name, s=selector: unit_step2(bench, n, s)))
    for unit, fn in plan:
        if time.time() > deadline:
            print(f"[selectors] budget spent; not starting {unit}", flush=True)
            break
        bench.run(unit, fn)
    bench.results["runs"][-1]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    bench.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
