"""Reproduce the LoFiT paper's tables on one model, with every baseline in the same harness.

Every experiment (task x method x setting) is a cached *unit*: its result is written to the results JSON
(atomically) as soon as it finishes, and a rerun with the same settings skips finished units, so the run
is resumable. Units run in a fixed priority order (0-shot, head selection, LoFiT 10%, LoRA, LoFiT 3%,
ITI, RED, then Table 2, stability, Table 1's second seed, out-of-domain, RepE and LoReFT, and
TruthfulQA fold 1 last); with `--budget-minutes` no new unit starts once the budget is spent and the
tables are written from whatever finished ("not run (budget)" elsewhere). The harness lives in
`benchmarks.harness.units`, the units in `benchmarks.paper.units`, the tables in `benchmarks.paper.render`;
this module is the plan and the command line.

Hyperparameters are picked on validation data only: learning rates by the final validation loss of the
training objective (on `--max-val` records of `val`), ITI's α by the validation metric (MC1+MC2 or EM on
`--max-val` records of `val_eval`). Test sets may be subsampled (`--max-test`, a seeded sample); the
results file says so.

    python -m benchmarks.paper                      # the committed run (~70 min CPU)
    python -m benchmarks.paper --max-train 0 --max-val 0 --max-test 0 --max-ood 0 \
        --epochs 5 --out DIR                        # paper scale (whole splits)
    python -m benchmarks.paper --quick              # smoke test (a few examples)
    python -m benchmarks.paper --quick --model DIR  # smoke test on a tiny model
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lofit.training import fastest_precision

from .. import RESULTS
from ..harness.environment import environment
from ..harness.internals import atomic_write_text
from ..harness.stats import sample
from ..harness.units import (
    EVAL_FIELDS,
    LOREFT_LRS,
    LOREFT_SHAPE,
    OOD_SETS,
    OTHER_TASK,
    QUICK,
    REPE_ALPHAS,
    REPE_LAYERS,
    RESULTS_NAME,
    SEEDS,
    TASKS,
    UNIT_FIELDS,
    Harness,
    Settings,
    final_val_loss,
    main_metric,
    settings_key,
    summary_line,
    trained_state,
)
from .render import render_markdown
from .units import (
    BudgetSpent,
    activations_and_labels,
    chunked_lr_search,
    decode_state,
    depth_layers,
    ensure_selection,
    heads_for,
    load_state,
    lr_search,
    lr_unit,
    probe_selection,
    train_baseline,
    train_lofit,
    unit_iti,
    unit_lofit,
    unit_loreft,
    unit_ood,
    unit_peft_like,
    unit_repe,
    unit_select,
    unit_zero_shot,
)

# ------------------------------------------------------------------------------------ plan
TABLE2_ROWS = ("lofit", "random", "probe", "other", "probe_layers", "bias")


def plan(
    h: Harness,
    tasks: Sequence[str],
    folds: Sequence[int],
    stages: Sequence[str],
    table2_rows: Sequence[str] = TABLE2_ROWS,
) -> list[tuple[str, Callable[[], Any]]]:
    """(unit id, runner) in priority order; `table2_rows` picks Table 2's rows ("other": another task's
    heads), so that two runs on one results file can share the table's work."""
    s = h.settings
    steps: list[tuple[str, Callable[[], Any]]] = []

    def add(unit: str, fn: Callable[..., dict[str, Any]], *args: Any) -> None:
        steps.append((unit, functools.partial(h.run, unit, functools.partial(fn, h, *args))))

    def adapters(method: str) -> None:
        for name in tasks:
            add(f"{method}/{name}/f0", unit_peft_like, name, 0, method)

    def table1(fold: int) -> None:
        names = [n for n in tasks if fold == 0 or n == "truthfulqa"]
        for name in names:  # method by method over the tasks: the cheapest complete rows first
            add(f"zero_shot/{name}/f{fold}", unit_zero_shot, name, fold)
        for name in names:
            add(f"select/{name}/f{fold}/s42", unit_select, name, fold, 42)
        for name in names:
            add(f"lofit/{name}/f{fold}/k{s.k_large}/lofit", unit_lofit, name, fold, s.k_large)
        if fold == 0 and "table3" in stages:
            adapters("lora")  # the main comparison (LoFiT 10% vs LoRA) completes first under a budget
        for name in names:
            add(f"lofit/{name}/f{fold}/k{s.k_small}/lofit", unit_lofit, name, fold, s.k_small)
        for name in names:
            add(f"iti/{name}/f{fold}", unit_iti, name, fold)

    if "table1" in stages:
        table1(0)
    if "table3" in stages:
        if "table1" not in stages:
            adapters("lora")
        adapters("red")
        adapters("red_half")
    if "table2" in stages:
        for name in tasks:
            other = OTHER_TASK[name]  # its heads: selected here, or cached (or borrowed: --heads-from)
            has_other = other in tasks or h.done(f"select/{other}/f0/s42")
            # probe_layers and bias: the two selectors the table lacked
            rows = [row for row in TABLE2_ROWS if row in table2_rows and (row != "other" or has_other)]
            for source in [other if row == "other" else row for row in rows]:
                add(f"lofit/{name}/f0/k{s.k_small}/{source}", unit_lofit, name, 0, s.k_small, source)
    if "stability" in stages:
        for name in tasks:
            add(f"select/{name}/f0/s{SEEDS[1]}", unit_select, name, 0, SEEDS[1])
    if "seed2" in stages:  # Table 1's second seed (the paper averages two): its own heads and training
        for k in (s.k_large, s.k_small):
            for name in tasks:
                add(f"lofit/{name}/f0/k{k}/lofit_s{SEEDS[1]}", unit_lofit, name, 0, k, "lofit", SEEDS[1])
    if "ood" in stages and "truthfulqa" in tasks:
        for method in ("base", "iti", "lofit", "lora"):
            add(f"ood/{method}", unit_ood, method)
    if "repe_loreft" in stages:  # Table 1's RepE and Table 3's LoReFT rows (fold 0)
        for name in tasks:
            add(f"repe/{name}/f0", unit_repe, name, 0)
        for name in tasks:
            if name != "truthfulqa":  # see unit_loreft
                add(f"loreft/{name}/f0", unit_loreft, name, 0)
    if "table1" in stages and 1 in folds and "truthfulqa" in tasks:
        table1(1)
    return steps


# ------------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few examples per task (smoke test)")
    parser.add_argument(
        "--model", default=None, help="bundled name or local directory (default smollm2-135m)"
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1], choices=[0, 1])
    parser.add_argument(
        "--stages",
        nargs="+",
        default=["table1", "table3", "table2", "stability", "seed2", "ood", "repe_loreft"],
        choices=["table1", "table3", "table2", "stability", "seed2", "ood", "repe_loreft"],
    )
    for name in ("max_train", "max_val", "max_test", "max_ood", "epochs", "max_length"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    for name in ("k_small", "k_large"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=None, help="fraction of heads")
    for name in ("lofit_lrs", "lora_lrs", "red_lrs", "iti_alphas"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, nargs="+", default=None)
    parser.add_argument("--budget-minutes", type=float, default=None, help="start no unit after this")
    parser.add_argument(
        "--render-only", action="store_true", help="write the tables from the results JSON, run nothing"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for paper_tables.*")
    parser.add_argument("--work-dir", type=Path, default=None, help="trained adapters for the OOD units")
    parser.add_argument(
        "--table2-rows",
        nargs="+",
        default=list(TABLE2_ROWS),
        choices=TABLE2_ROWS,
        help="Table 2's rows to run (other = another task's heads); two runs can split them",
    )
    parser.add_argument(
        "--heads-from",
        type=Path,
        default=None,
        help="another results file whose selections, probes and tuned LoFiT lr this run uses instead of its "
        "own (same data settings; e.g. a --precision fp32 Table 2 on the heads of the bf16 run)",
    )
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace) -> Settings:
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    scalars = ("max_train", "max_val", "max_test", "max_ood", "epochs", "precision", "model", "max_length")
    for name in (*scalars, "k_small", "k_large", "lofit_lrs", "lora_lrs", "red_lrs", "iti_alphas"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.heads_from is not None:
        values["heads_from"] = str(args.heads_from)
    return Settings(**values)


def precision_warning(precision: str, fastest: str) -> str | None:
    """A warning when the run's precision is emulated here (bf16 on a CPU without bf16 matmul units).

    Example:
        >>> precision_warning("bf16", "bf16") is None, precision_warning("fp32", "bf16") is None
        (True, True)
        >>> print(precision_warning("bf16", "fp32").split(":")[0])
        [paper] warning
    """
    if precision != "bf16" or fastest == "bf16":
        return None
    return (
        "[paper] warning: bf16 autocast is emulated on this machine (no GPU, no avx512_bf16/AMX): a unit runs "
        "~10x slower than in fp32 (measured 14x on a 2-core AMD EPYC). The committed paper-scale units are "
        "bf16, so resume them on a machine that has these instructions, or start a separate --precision fp32 "
        "run (its units are cached under their own settings key)."
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = build_settings(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_NAME + ("_quick" if args.quick else "")
    budget = args.budget_minutes
    deadline = time.time() + budget * 60 if budget is not None else float("inf")
    heatmap_dir = args.out / ("heatmaps_quick" if args.quick else "heatmaps")
    notes = None if args.quick else args.out / f"{stem}_notes.md"  # hand-written findings, if any
    results_path = args.out / f"{stem}.json"
    if args.render_only:  # renders the file as it stands, whatever its settings; a run may be writing it
        if not results_path.is_file():
            raise SystemExit(f"--render-only: no results file at {results_path}; run without it first")
        stored = json.loads(results_path.read_text(encoding="utf-8"))
        text = render_markdown(stored, args.tasks, heatmap_dir, quick=args.quick, notes=notes)
        atomic_write_text(args.out / f"{stem}.md", text)
        return 0
    warning = precision_warning(settings.precision, fastest_precision())
    if warning:
        print(warning, file=sys.stderr, flush=True)
    work_dir = args.work_dir or args.out / f".{stem}_work"
    work_dir.mkdir(parents=True, exist_ok=True)
    harness = Harness(settings, results_path, work_dir, deadline)
    command = "python -m benchmarks.paper " + " ".join(argv if argv is not None else sys.argv[1:])
    this_run = {"command": command.strip(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), **environment()}
    harness.results.setdefault("runs", []).append(this_run)
    harness.save()
    torch.manual_seed(0)
    for unit, step in plan(harness, args.tasks, args.folds, args.stages, args.table2_rows):
        if harness.done(unit):
            continue
        try:
            step()
        except BudgetSpent as error:
            print(f"[paper] {unit} waits for {error} (budget spent or run elsewhere)", flush=True)
        except FileNotFoundError as error:  # an OOD unit whose adapter was never trained
            harness.results["units"][unit] = {"error": str(error)}
            harness.save()
    this_run["wall_s"] = round(time.time() - harness.started, 1)
    this_run["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    harness.save()
    text = render_markdown(harness.results, args.tasks, heatmap_dir, quick=args.quick, notes=notes)
    atomic_write_text(args.out / f"{stem}.md", text)
    print(f"[paper] wrote {args.out / (stem + '.md')} and {harness.results_path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "EVAL_FIELDS",
    "LOREFT_LRS",
    "LOREFT_SHAPE",
    "OOD_SETS",
    "OTHER_TASK",
    "QUICK",
    "REPE_ALPHAS",
    "REPE_LAYERS",
    "RESULTS_NAME",
    "SEEDS",
    "TASKS",
    "UNIT_FIELDS",
    "BudgetSpent",
    "Harness",
    "Settings",
    "activations_and_labels",
    "build_settings",
    "chunked_lr_search",
    "decode_state",
    "depth_layers",
    "ensure_selection",
    "environment",
    "final_val_loss",
    "heads_for",
    "load_state",
    "lr_search",
    "lr_unit",
    "main",
    "main_metric",
    "parse_args",
    "plan",
    "probe_selection",
    "sample",
    "settings_key",
    "summary_line",
    "train_baseline",
    "train_lofit",
    "trained_state",
    "unit_iti",
    "unit_lofit",
    "unit_loreft",
    "unit_ood",
    "unit_peft_like",
    "unit_repe",
    "unit_select",
    "unit_zero_shot",
]
