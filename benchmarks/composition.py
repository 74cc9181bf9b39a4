"""Adapter composition: do task adapters interfere when combined?

For each task of the pairs (default: MQuAKE + CLUTRR and TruthfulQA + MQuAKE) a LoFiT adapter is made
the usual way on the bundled model (step 1: L1 head selection with the task's λ and lr; step 2: offsets
on its top `k` = the task's default fraction, at the step-2 lr below), and saved. For each pair (A, B)
the two adapters are loaded into one model and combined with `lofit.combine_adapters`:

- "sum": weights (1, 1): each adapter's edit as is (on disjoint heads: both applied at once);
- "mean": weights (0.5, 0.5).

Each task's test split is then scored with: the base model, its own adapter, "sum" and "mean". The
interference of a combination on a task is its score minus the own adapter's (negative: the other
task's adapter hurts). Binomial standard errors (exact match, MC1) are given for each score; the head
overlap of the two adapters (Jaccard) too.

    OMP_NUM_THREADS=1 nice -n 5 python -m benchmarks.composition                    # the real run (long)
    OMP_NUM_THREADS=1 python -m benchmarks.composition --precision fp32             # CPUs without bf16
    python -m benchmarks.composition --quick --model DIR --pairs mquake+clutrr      # smoke test

Results: OUT/composition.json (every unit, resumable: a finished unit is not rerun with the same
settings) and OUT/composition.md; `--quick` writes composition_quick.*. Reuses the paper-tables harness
(`benchmarks.harness.units`: settings, seeded data subsets, cached units).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lofit import LofitModel, combine_adapters, select_heads, train_offsets

from . import RESULTS
from .harness.internals import atomic_write_text
from .harness.units import QUICK, Harness, Settings

PAIRS = ("mquake+clutrr", "truthfulqa+mquake")
# Step-2 learning rates chosen on the validation split by benchmarks.paper (128 training
# records, 3 epochs; benchmarks/results/paper_tables.json, units lofit/<task>/f0/k0.1/lofit), as
# benchmarks.selector_comparison uses them: nothing is tuned on this comparison's test records.
STEP2_LR = {"truthfulqa": 1e-2, "mquake": 5e-2, "clutrr": 5e-2}
COMBINATIONS = {"sum": (1.0, 1.0), "mean": (0.5, 0.5)}


def adapter_dir(h: Harness, name: str) -> Path:
    return h.work_dir / "adapters" / name


def unit_adapter(h: Harness, name: str) -> dict[str, Any]:
    """Steps 1 and 2 for task `name`; the adapter is saved under the work dir."""
    task = h.task(name)
    train = h.split(name, 0, "train")
    base, tok = h.base()
    selection = select_heads(
        base, tok, train, method="lofit", objective=task.objective, l1=float(task.defaults["l1"]),
        **h.train_kwargs(float(task.defaults["lr_select"])),
    )  # fmt: skip
    heads = selection.top(task.defaults["k"])
    base, tok = h.base()
    model = train_offsets(
        base, tok, train, heads, objective=task.objective, val_data=h.val_data(name, 0),
        **h.train_kwargs(STEP2_LR[name]),
    )  # fmt: skip
    model.save_pretrained(adapter_dir(h, name))
    return {
        "heads": {str(layer): v for layer, v in heads.items()},
        "k": sum(len(v) for v in heads.values()),
        "lr": STEP2_LR[name],
    }


def standard_error(metrics: dict[str, float], n: int) -> dict[str, float]:
    """Binomial SEs of the 0/1-per-record metrics (exact match, MC1); MC2 is not 0/1 and gets none."""
    return {
        key: math.sqrt(max(value * (1 - value), 0.0) / n)
        for key, value in metrics.items()
        if key in ("exact_match", "exact_match_stripped", "mc1", "accuracy") and n > 0
    }


def unit_pair(h: Harness, pair: str) -> dict[str, Any]:
    """Score each task of `pair` with the base, its own adapter and each combination."""
    names = pair.split("+")
    base, tok = h.base()
    model = LofitModel.from_pretrained(base, adapter_dir(h, names[0]), adapter_name=names[0])
    model.load_adapter(adapter_dir(h, names[1]), adapter_name=names[1])
    for combination, weights in COMBINATIONS.items():
        combine_adapters(model, names, weights=list(weights), new_name=combination)
    heads = [{(layer, x) for layer, hs in model.selected_heads(n).items() for x in hs} for n in names]
    result: dict[str, Any] = {"jaccard_heads": len(heads[0] & heads[1]) / len(heads[0] | heads[1])}
    for name in names:
        n = len(h.split(name, 0, "test"))
        scores: dict[str, Any] = {"n_test": n}
        with model.disable_adapter():
            scores["base"] = h.evaluate(model, tok, name, 0, "test")
        for adapter in (name, *COMBINATIONS):
            model.set_adapter(adapter)
            scores["own" if adapter == name else adapter] = h.evaluate(model, tok, name, 0, "test")
        for key in ("base", "own", *COMBINATIONS):
            scores[f"{key}_se"] = standard_error(scores[key], n)
        for combination in COMBINATIONS:
            scores[f"{combination}_minus_own"] = {
                k: scores[combination][k] - scores["own"][k] for k in scores["own"]
            }
        result[name] = scores
    return result


def render(h: Harness, pairs: Sequence[str], command: str) -> str:
    lines = [
        "# Adapter composition: interference between task adapters",
        "",
        f"Command: `{command}`",
        f"Settings: {h.settings.model}, {h.settings.max_train} training / {h.settings.max_test} test records"
        f" per task, {h.settings.epochs} epochs, {h.settings.precision}; combinations {COMBINATIONS}.",
        "",
        "| pair | task | metric | base | own adapter | sum (1, 1) | mean (.5, .5) | sum − own | mean − own |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in pairs:
        result = h.get(f"pair/{pair}")
        if result is None:
            lines.append(f"| {pair} | not run | | | | | | | |")
            continue
        for name in pair.split("+"):
            s = result[name]
            for metric in s["own"]:
                cells = [
                    f"{s[key][metric]:.3f}"
                    + (f" ± {s[key + '_se'][metric]:.3f}" if metric in s[key + "_se"] else "")
                    for key in ("base", "own", "sum", "mean")
                ]
                deltas = [f"{s[c + '_minus_own'][metric]:+.3f}" for c in COMBINATIONS]
                lines.append(f"| {pair} (heads Jaccard {result['jaccard_heads']:.2f}) | {name} | {metric} | "
                             + " | ".join(cells + deltas) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few examples per task (smoke test)")
    parser.add_argument(
        "--model", default=None, help="bundled name or local directory (default smollm2-135m)"
    )
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), help="task pairs, e.g. mquake+clutrr")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=None,
        help="default bf16 (fp32 on a CPU without bf16)",
    )
    parser.add_argument("--budget-minutes", type=float, default=None, help="start no unit after this")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for pair in args.pairs:
        names = pair.split("+")
        if len(names) != 2 or any(n not in STEP2_LR for n in names) or names[0] == names[1]:
            parser.error(f"--pairs: {pair!r} is not two different tasks of {sorted(STEP2_LR)} joined by '+'")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    for name in ("model", "max_train", "max_test", "epochs", "precision"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    stem = "composition" + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_minutes * 60 if args.budget_minutes is not None else float("inf")
    h = Harness(Settings(**values), args.out / f"{stem}.json", args.out / f".{stem}_work", deadline)
    command = "python -m benchmarks.composition " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(0)
    for pair in args.pairs:
        names = pair.split("+")
        for name in names:  # a cached unit whose adapter folder is gone is trained again
            if h.done(f"adapter/{name}") and not adapter_dir(h, name).is_dir():
                del h.results["units"][f"adapter/{name}"]
        ready = [h.run(f"adapter/{name}", lambda name=name: unit_adapter(h, name)) for name in names]
        if all(r is not None for r in ready) and all(adapter_dir(h, n).is_dir() for n in names):
            h.run(f"pair/{pair}", lambda pair=pair: unit_pair(h, pair))
    atomic_write_text(args.out / f"{stem}.md", render(h, args.pairs, command.strip()))
    print(f"[composition] wrote {args.out / (stem + '.md')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
