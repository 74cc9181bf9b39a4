"""The scale question: does the LoFiT − LoRA gap shrink with model size?

LoFiT 10%, LoRA (r 8, q/v) and RED at n ∈ {16, 64, 256} on MQuAKE and CLUTRR, seeds 42 and 12450, each
method's learning rate chosen on validation, on two models: SmolLM2-135M (the bundled default) and Gemma 3
270M. Two sizes, not a trend. Each model is one `benchmarks.curves` Fig. 4 run (its protocol and settings, one JSON
per unit, `--commit`, reruns skip finished units) under `results/scale/<model>/`; this script runs them
and renders one table and one plot over both (`results/scale/scale.md`, `scale.png`). MQuAKE's training
split has 134 records, so its n = 256 point is n = 134, the whole split.

    python -m benchmarks.scale --models smollm2-135m --commit    # one model's units
    python -m benchmarks.scale --models gemma3-270m --commit --budget-minutes 120
    python -m benchmarks.scale --render-only                      # scale.md + scale.png

Units run small n first: at each n (ascending) each model's LoFiT and LoRA, then its RED. Any other option
goes to `benchmarks.curves` after the scale defaults (the last value wins), e.g. `--tasks clutrr`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lofit.tasks import DataError, load_task

from . import RESULTS
from .curves import run as curves
from .curves.render import METHOD_TITLES, TITLES, metric_of
from .harness.internals import atomic_write_text, atomic_write_with
from .harness.stats import mean_se

MODELS = ("smollm2-135m", "gemma3-270m")
MODEL_TITLES = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma 3 270M"}
TASKS = ("mquake", "clutrr")
SIZES = (16, 64, 256)
SEEDS = (42, 12450)
METHODS = ("lofit", "lora", "red")
SCALE_ARGS = [
    "--stages", "fig4",
    "--tasks", *TASKS,
    "--sizes", *map(str, SIZES),
    "--seeds", *map(str, SEEDS),
    "--methods", *METHODS,
]  # fmt: skip
OUT = RESULTS / "scale"


def model_dir_name(model: str) -> str:
    """The results folder of `model` (a bundled name, or the last part of a path).

    Example:
        >>> model_dir_name("gemma3-270m"), model_dir_name("/tmp/x/tiny/")
        ('gemma3-270m', 'tiny')
    """
    return Path(model).name or model


def curves_argv(model: str, out: Path, extra: Sequence[str]) -> list[str]:
    return [*SCALE_ARGS, *extra, "--model", model, "--out", str(out / model_dir_name(model))]


# ------------------------------------------------------------------------------------ render
Points = dict[tuple[str, str, str, int], dict[int, float]]  # (model, task, method, n) -> {seed: metric}


Unit = tuple[str, str, int, int, str, dict[str, Any]]  # model, task, n, seed, method, result


def finished_units(out: Path, models: Sequence[str], extra: Sequence[str] = ()) -> list[Unit]:
    """The scale units of each model whose settings key matches its curves run's."""
    found: list[Unit] = []
    for model in models:
        settings = curves.build_settings(curves.parse_args(curves_argv(model, out, extra)))
        for path in sorted((out / model_dir_name(model) / "units").glob("*.json")):
            result = json.loads(path.read_text(encoding="utf-8"))
            unit = result.get("unit", "")
            kind = re.match(r"fig4/(\w+)/n(\d+)/s(\d+)/(\w+)$", unit)
            if not kind or result.get("settings_key") != settings.key(unit):
                continue
            task, n, seed, method = kind[1], int(kind[2]), int(kind[3]), kind[4]
            if task in TASKS and seed in SEEDS and method in (*METHODS, "select"):
                found.append((model, task, n, seed, method, result))
    return found


def load_points(
    out: Path, models: Sequence[str], extra: Sequence[str] = (), metric: str | None = None
) -> tuple[Points, dict[str, Any]]:
    """Test metrics (the task's paper metric, or `metric` where a unit has it) of the finished units, and
    their wall times ({(model, task, method, n): [wall_s]})."""
    points: Points = {}
    walls: dict[tuple[str, str, str, int], list[float]] = {}
    for model, task, n, seed, method, result in finished_units(out, models, extra):
        walls.setdefault((model, task, method, n), []).append(float(result.get("wall_s", math.nan)))
        value = (result.get("test") or {}).get(metric or metric_of(task))
        if method != "select" and value is not None:
            points.setdefault((model, task, method, n), {})[seed] = float(value)
    return points, walls


def lr_table(units: Sequence[Unit], models: Sequence[str]) -> list[str]:
    """How often each lr of each method's grid won on validation (an edge that always wins: widen the grid).

    Example:
        >>> lr_table([("m", "mquake", 16, 42, "lora", {"lr": 1e-3}), ("m", "clutrr", 16, 42, "lora",
        ...           {"lr": 1e-3})], ["m"])[2]
        '| m | LoRA r8 q,v | 0.001: 2 |'
    """
    lines = ["| model | method | chosen lr: units |", "|---|---|---|"]
    for model in models:
        for method in METHODS:
            counts: dict[float, int] = {}
            for m, _, _, _, meth, result in units:
                if m == model and meth == method and "lr" in result:
                    counts[float(result["lr"])] = counts.get(float(result["lr"]), 0) + 1
            if counts:
                tally = ", ".join(f"{lr:g}: {c}" for lr, c in sorted(counts.items()))
                lines.append(f"| {MODEL_TITLES.get(model, model)} | {METHOD_TITLES[method]} | {tally} |")
    return lines


def fmt(values: Sequence[float]) -> str:
    """Mean ± SE over seeds in points, with the number of seeds ('–' for none).

    Example:
        >>> fmt([0.2, 0.3]), fmt([0.25]), fmt([])
        ('25.0 ± 5.0 (2)', '25.0 (1)', '–')
    """
    if not values:
        return "–"
    mean, se = mean_se([100 * v for v in values])
    return f"{mean:.1f}" + ("" if math.isnan(se) else f" ± {se:.1f}") + f" ({len(values)})"


def paired(points: Points, model: str, task: str, n: int, other: str = "lora") -> list[float]:
    """LoFiT minus `other`, paired by seed (only the seeds both have)."""
    a, b = points.get((model, task, "lofit", n), {}), points.get((model, task, other, n), {})
    return [a[s] - b[s] for s in sorted(a) if s in b]


def scale_table(
    points: Points, planned: dict[str, list[int]], models: Sequence[str], tasks: Sequence[str] = TASKS
) -> list[str]:
    head = ["task", "n", "model", "LoFiT 10%", "LoRA r8 q,v", "RED", "LoFiT − LoRA (paired)", "LoFiT − RED"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in tasks:
        for n in sorted({*planned.get(task, []), *(k[3] for k in points if k[1] == task)}):
            for model in models:
                cells = [fmt(list(points.get((model, task, m, n), {}).values())) for m in METHODS]
                diffs = [fmt(paired(points, model, task, n, other)) for other in ("lora", "red")]
                title = MODEL_TITLES.get(model, model)
                lines.append("| " + " | ".join([TITLES[task], str(n), title, *cells, *diffs]) + " |")
    return lines


def missing(points: Points, models: Sequence[str], sizes: dict[str, list[int]]) -> list[str]:
    """The (model, task, n, seed, method) cells the plan has and no finished unit fills."""
    gaps = []
    for model in models:
        for task in TASKS:
            for n in sizes[task]:
                for method in METHODS:
                    have = points.get((model, task, method, n), {})
                    seeds = [str(s) for s in SEEDS if s not in have]
                    if seeds:
                        gaps.append(
                            f"{MODEL_TITLES.get(model, model)} {TITLES[task]} n {n} {method}: "
                            f"seed {', '.join(seeds)}"
                        )
    return gaps


def planned_sizes(task: str, sizes: Sequence[int]) -> list[int]:
    """The n of `task` a run of `sizes` trains on (the whole split replaces any n above it)."""
    try:
        total = len(load_task(task).train)
    except (DataError, OSError):
        return sorted(sizes)
    return sorted({min(n, total) for n in sizes})


def cost_table(walls: dict[tuple[str, str, str, int], list[float]], models: Sequence[str]) -> list[str]:
    head = ["model", "task", "n", "select", "LoFiT", "LoRA", "RED"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in models:
        for task in TASKS:
            for n in sorted({n for (m, t, _, n) in walls if m == model and t == task}):
                cells = []
                for method in ("select", *METHODS):
                    times = walls.get((model, task, method, n), [])
                    cells.append(f"{sum(times) / len(times) / 60:.1f}" if times else "–")
                lines.append(
                    "| " + " | ".join([MODEL_TITLES.get(model, model), TITLES[task], str(n), *cells]) + " |"
                )
    return lines


def plot(points: Points, models: Sequence[str], path: Path) -> bool:
    """One panel per task: LoFiT − LoRA (paired, mean ± SE over seeds) against n, one line per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    tasks = [t for t in TASKS if any(k[1] == t for k in points)]
    if not tasks:
        return False
    figure = Figure(figsize=(4.4 * len(tasks), 3.4))
    FigureCanvasAgg(figure)
    for i, task in enumerate(tasks):
        axes = figure.add_subplot(1, len(tasks), i + 1)
        axes.axhline(0.0, color="grey", linewidth=0.8)
        sizes = sorted({n for (_, t, _, n) in points if t == task})
        for model in models:
            xs, ys, errors = [], [], []
            for n in sizes:
                diffs = paired(points, model, task, n)
                if diffs:
                    mean, se = mean_se([100 * d for d in diffs])
                    xs.append(n), ys.append(mean), errors.append(0.0 if math.isnan(se) else se)
            if xs:
                label = MODEL_TITLES.get(model, model)
                axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=label)
        axes.set_xscale("log")
        axes.set_xticks(sizes, [str(n) for n in sizes])
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.set_xlabel("training examples (n)")
        axes.set_ylabel(f"LoFiT − LoRA, test {metric_of(task)} (points)")
        axes.set_title(TITLES[task])
        axes.legend(fontsize=8)
    atomic_write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return True


def render(out: Path, models: Sequence[str], extra: Sequence[str] = ()) -> str:
    """scale.md (returned and written) and scale.png in `out`, from whatever units have finished."""
    points, walls = load_points(out, models, extra)
    settings = curves.build_settings(curves.parse_args(curves_argv(models[0], out, extra)))
    planned = {
        t: planned_sizes(t, curves.parse_args(curves_argv(models[0], out, extra)).sizes) for t in TASKS
    }
    lines = [
        "# The scale question: LoFiT − LoRA on two model sizes",
        "",
        f"Models: {', '.join(MODEL_TITLES.get(m, m) for m in models)}. Protocol: `benchmarks.curves` Fig. 4 "
        f"(nested seeded training subsets; {settings.epochs} epochs, batch {settings.batch_size}, "
        f"{settings.precision}; lr per unit from LoFiT {settings.lofit_lrs}, LoRA {settings.lora_lrs}, RED "
        f"{settings.red_lrs} by the final validation loss on {settings.max_val} validation records; test: "
        f"the same seeded {settings.max_test} test records for every unit). Test %, mean ± SE over seeds "
        "(number of seeds); differences are paired by seed on the same test records. The SE over two seeds "
        "leaves out the test-sampling error (about 4.6 points for one accuracy near 30% on 100 records). "
        "MQuAKE's training split has 134 records: its largest n is 134 (the whole split), not 256.",
        "",
        *scale_table(points, planned, models),
        "",
    ]
    stripped, _ = load_points(out, models, extra, metric="exact_match_stripped")
    if any(key[1] == "mquake" for key in stripped):
        lines += [
            'MQuAKE\'s paper rule does not strip whitespace (the answer must follow "A:" with no space); '
            "the same units scored with whitespace stripped (`exact_match_stripped`), to show whether a "
            "difference is only a leading space:",
            "",
            *scale_table(stripped, planned, models, ("mquake",)),
            "",
        ]
    if plot(points, models, out / "scale.png"):
        lines += ["![LoFiT − LoRA against n, per model](scale.png)", ""]
    gaps = missing(points, models, planned)
    lines += ["## Cells not finished yet", ""]
    lines += [f"- {gap}" for gap in gaps] or ["None: every planned cell has both seeds."]
    lines += [
        "",
        "## Learning rates chosen on validation (grid edges winning every time: the grid is narrow)",
        "",
    ]
    lines += [*lr_table(finished_units(out, models, extra), models)]
    lines += ["", "## Wall time per unit (minutes, mean over the finished units)", ""]
    lines += [*cost_table(walls, models), ""]
    notes = out / "scale_notes.md"
    if notes.is_file():
        lines += [notes.read_text(encoding="utf-8").rstrip(), ""]
    text = "\n".join(lines)
    atomic_write_text(out / "scale.md", text)
    return text


# ------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="bundled names or local dirs")
    parser.add_argument("--render-only", action="store_true", help="write scale.md and scale.png only")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), help="training-set sizes n")
    parser.add_argument("--budget-minutes", type=float, default=None, help="start no unit after this")
    args, extra = parser.parse_known_args(argv)
    deadline = time.time() + 60 * args.budget_minutes if args.budget_minutes is not None else math.inf
    if not args.render_only:
        # Small n first, both models at each n (each n: LoFiT and LoRA, then RED; see curves.fig4_plan).
        for n in sorted(args.sizes):
            for model in args.models:
                left = (deadline - time.time()) / 60
                if left <= 0:
                    break
                budget = [] if math.isinf(left) else ["--budget-minutes", f"{left:.2f}"]
                code = curves.main(curves_argv(model, args.out, [*extra, "--sizes", str(n), *budget]))
                if code:
                    return code
    render(args.out, args.models, [*extra, "--sizes", *map(str, args.sizes)])
    print(f"[scale] wrote {args.out / 'scale.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
