"""Reproduce the LoFiT paper's tables on one model, with every baseline in the same harness (issue #7).

Every experiment (task x method x setting) is a cached *unit*: its result is written to the results JSON
(atomically) as soon as it finishes, and a rerun with the same settings skips finished units, so the run
is resumable. Units run in a fixed priority order (0-shot, head selection, LoFiT 10%, LoRA, LoFiT 3%,
ITI, RED, then Table 2, stability, out-of-domain, and TruthfulQA fold 1 last); with `--budget-minutes`
no new unit starts once the budget is spent and the tables are written from whatever finished ("not run
(budget)" elsewhere).

Hyperparameters are picked on validation data only: learning rates by the final validation loss of the
training objective (on `--max-val` records of `val`), ITI's α by the validation metric (MC1+MC2 or EM on
`--max-val` records of `val_eval`). Test sets may be subsampled (`--max-test`, a seeded sample); the
results file says so.

    PYTHONPATH=src python benchmarks/paper_tables.py                      # the committed run (~70 min CPU)
    PYTHONPATH=src python benchmarks/paper_tables.py --max-train 0 --max-val 0 --max-test 0 --max-ood 0 \
        --epochs 5 --out DIR                                               # paper scale (whole splits)
    PYTHONPATH=src python benchmarks/paper_tables.py --quick              # smoke test (a few examples)
    PYTHONPATH=src python benchmarks/paper_tables.py --quick --model DIR  # smoke test on a tiny model
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _paper_render import render_markdown  # noqa: E402

from lofit import evaluate, load_model, select_heads, train_offsets  # noqa: E402
from lofit.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from lofit.baselines import apply_iti, get_lora_model, get_red_model, iti_offsets  # noqa: E402
from lofit.baselines.iti import head_activations_at_last_token, mass_mean_directions  # noqa: E402
from lofit.baselines.parameters import trainable_parameters  # noqa: E402
from lofit.config import LofitConfig  # noqa: E402
from lofit.heads import find_output_projections  # noqa: E402
from lofit.model import get_lofit_model  # noqa: E402
from lofit.objectives import TokenScorer, make_objective, mean_loss  # noqa: E402
from lofit.probe import probe_head_scores  # noqa: E402
from lofit.selection import HeadSelection, probe_texts, rank_heads  # noqa: E402
from lofit.tasks import load_task  # noqa: E402
from lofit.tasks.multiple_choice import load_mc_split  # noqa: E402
from lofit.trainer import TrainingConfig, seed_everything, train_adapter  # noqa: E402

TASKS = ("truthfulqa", "mquake", "clutrr")
OOD_SETS = ("arc_easy", "piqa", "openbookqa")
OTHER_TASK = {"truthfulqa": "mquake", "mquake": "clutrr", "clutrr": "truthfulqa"}
SEEDS = (42, 12450)
RESULTS_NAME = "paper_tables"


# ------------------------------------------------------------------------------------ settings
@dataclass
class Settings:
    """Everything that changes a unit's result; its hash keys the cache."""

    model: str = "smollm2-135m"
    # The defaults are the committed run's (≈70 min on a 2-core CPU); 0 = the whole split, and
    # `--max-train 0 --max-val 0 --max-test 0 --max-ood 0 --epochs 5` is the paper's scale.
    max_train: int = 128
    max_val: int = 32
    max_test: int = 100
    max_ood: int = 50
    epochs: int = 3
    batch_size: int = 8
    k_small: float = 0.03
    k_large: float = 0.10
    lofit_lrs: list[float] = field(default_factory=lambda: [1e-2, 5e-2])
    lora_lrs: list[float] = field(default_factory=lambda: [1e-3, 5e-3])
    red_lrs: list[float] = field(default_factory=lambda: [1e-2, 5e-2])
    iti_alphas: list[float] = field(default_factory=lambda: [5.0, 15.0])
    iti_k: float = 0.03
    precision: str = "bf16"
    eval_batch_size: int = 16
    sample_seed: int = 0
    max_length: int | None = None  # truncate training sequences (prompts from the left)
    # "final": one validation pass after training instead of one per epoch (the lr choice only needs
    # the last); None = per epoch, as the committed runs did.
    validate: str | None = None
    # RepE / LoReFT grids (None = the defaults below; None keeps the cache keys of earlier runs).
    repe_layers: list[float] | None = None
    repe_alphas: list[float] | None = None
    loreft_lrs: list[float] | None = None

    def key(self, unit: str | None = None) -> str:
        """Hash of the fields `unit` depends on (all fields for most units)."""
        return settings_key(asdict(self), unit)


# Units that depend on only some settings keep their cached result when the others change.
EVAL_FIELDS = ("model", "max_test", "precision", "eval_batch_size", "sample_seed")
UNIT_FIELDS: dict[str, tuple[str, ...]] = {
    "zero_shot": EVAL_FIELDS,
    "select": (
        "model",
        "max_train",
        "max_val",
        "epochs",
        "batch_size",
        "precision",
        "sample_seed",
        "max_length",
    ),
    "iti": (*EVAL_FIELDS, "max_train", "max_val", "iti_alphas", "iti_k"),
}


REPE_LAYERS = [0.25, 0.5, 0.75]  # fractions of the depth
REPE_ALPHAS = [1.0, 5.0]  # α = 5 is the paper's
LOREFT_LRS = [1e-3, 5e-3]
LOREFT_SHAPE = {"layers": [0.25, 0.5, 0.75], "rank": 4, "first": 3, "last": 3}  # fixed (CPU): lr grid only


def settings_key(values: dict[str, Any], unit: str | None = None) -> str:
    fields = UNIT_FIELDS.get((unit or "").split("/")[0])
    chosen = {k: values[k] for k in fields} if fields else values
    chosen = {k: v for k, v in chosen.items() if v is not None}  # a new optional field keeps old keys
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:12]


QUICK = {
    "max_train": 8,
    "max_val": 4,
    "max_test": 4,
    "max_ood": 4,
    "epochs": 1,
    "lofit_lrs": [1e-2],
    "lora_lrs": [1e-3],
    "red_lrs": [1e-2],
    "iti_alphas": [15.0],
    "max_length": 96,  # tiny test models accept 128 positions
    "repe_layers": [0.5],
    "repe_alphas": [5.0],
    "loreft_lrs": [1e-3],
}


def sample(records: Sequence[Any], limit: int, seed: int) -> list[Any]:
    """A seeded random subset of `limit` records (all of them, in order, when there are fewer)."""
    records = list(records)
    if limit <= 0 or len(records) <= limit:
        return records
    picked = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in picked]


# ------------------------------------------------------------------------------------ harness
class Harness:
    """Loads models and tasks, runs units, and keeps the results JSON up to date."""

    def __init__(self, settings: Settings, results_path: Path, work_dir: Path, deadline: float) -> None:
        self.settings = settings
        self.results_path = results_path
        self.work_dir = work_dir
        self.deadline = deadline
        self.started = time.time()
        self.tasks: dict[str, Any] = {}
        self.results = self._load_results()
        self.log_lines: list[str] = []

    # ------------------------------------------------------------------------ bookkeeping
    def _load_results(self) -> dict[str, Any]:
        fresh: dict[str, Any] = {"settings": asdict(self.settings), "units": {}, "runs": []}
        if not self.results_path.is_file():
            return fresh
        data = json.loads(self.results_path.read_text(encoding="utf-8"))
        old_settings = data.get("settings", {})
        for unit, result in data.get("units", {}).items():
            key = result.get("settings_key") or settings_key(old_settings, unit)
            if key == self.settings.key(unit):
                result["settings_key"] = key
                fresh["units"][unit] = result
            else:
                print(f"[paper] settings changed: dropping cached {unit}", flush=True)
        fresh["runs"] = data.get("runs", [])
        return fresh

    def save(self) -> None:
        atomic_write_json(self.results_path, self.results)

    def done(self, unit: str) -> bool:
        return unit in self.results["units"]

    def get(self, unit: str) -> dict[str, Any] | None:
        return self.results["units"].get(unit)

    def over_budget(self) -> bool:
        return time.time() > self.deadline

    def run(self, unit: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Run `fn` unless `unit` is cached; store its result (with wall time) and save at once."""
        if self.done(unit):
            return self.get(unit)
        if self.over_budget():
            print(f"[paper] budget spent: not starting {unit}", flush=True)
            return None
        print(f"[paper] {time.strftime('%H:%M:%S')} start {unit}", flush=True)
        started = time.perf_counter()
        result = fn()
        result["wall_s"] = round(time.perf_counter() - started, 1)
        result["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        result["settings_key"] = self.settings.key(unit)
        self.results["units"][unit] = result
        self.save()
        print(f"[paper] done {unit} in {result['wall_s']}s: {summary_line(result)}", flush=True)
        return result

    # ------------------------------------------------------------------------ data and models
    def task(self, name: str, fold: int = 0) -> Any:
        key = f"{name}{fold}"
        if key not in self.tasks:
            self.tasks[key] = load_task(name, fold=fold)
        return self.tasks[key]

    def split(self, name: str, fold: int, split: str) -> list[Any]:
        s = self.settings
        limit = {"train": s.max_train, "val": s.max_val, "val_eval": s.max_val, "test": s.max_test}[split]
        return sample(getattr(self.task(name, fold), split), limit, s.sample_seed)

    def base(self) -> tuple[nn.Module, Any]:
        """A fresh copy of the base model (so no wrapper of one unit leaks into another)."""
        return load_model(self.settings.model)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.settings.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def evaluate(self, model: nn.Module, tok: Any, name: str, fold: int, split: str) -> dict[str, float]:
        task = self.task(name, fold)
        kwargs: dict[str, Any] = {"batch_size": self.settings.eval_batch_size, "progress": False}
        if task.eval_task == "exact_match":
            kwargs.update(extraction=task.extraction, max_new_tokens=task.max_new_tokens)
        model.eval()
        with self.autocast(), torch.no_grad():
            return evaluate(model, tok, task.eval_task, self.split(name, fold, split), **kwargs)

    def val_data(self, name: str, fold: int) -> list[Any] | None:
        """Validation records for the trainer (None when only the final model is validated)."""
        return None if self.settings.validate == "final" else self.split(name, fold, "val")

    def finish_validation(self, model: nn.Module, tok: Any, name: str, fold: int, history: Any) -> Any:
        """With validate="final", append the final model's validation loss to `history`."""
        if self.settings.validate != "final":
            return history
        task = self.task(name, fold)
        objective = make_objective(
            task.objective, tok, self.settings.max_length, float(task.defaults.get("beta", 0.5))
        )
        examples = objective.encode(self.split(name, fold, "val"))
        model.eval()
        with self.autocast():
            device = next(model.parameters()).device
            scorer = TokenScorer(model)
            loss = mean_loss(objective, scorer, examples, self.settings.eval_batch_size, device)["loss"]
        record = {"epoch": self.settings.epochs, "val_loss": float(loss)}
        validation = history.validation if hasattr(history, "validation") else history["validation"]
        validation.append(record)
        return history

    def train_kwargs(self, lr: float, seed: int = 42) -> dict[str, Any]:
        s = self.settings
        return {
            "epochs": s.epochs,
            "batch_size": s.batch_size,
            "lr": lr,
            "seed": seed,
            "precision": s.precision,
            "progress": False,
            **({"max_length": s.max_length} if s.max_length is not None else {}),
        }


def summary_line(result: dict[str, Any]) -> str:
    test = result.get("test")
    return json.dumps(test) if test is not None else ", ".join(sorted(result)[:6])


def main_metric(name: str, metrics: dict[str, float]) -> float:
    """One number per task for choosing α: mean of MC1 and MC2, or the exact match."""
    if name == "truthfulqa":
        return (metrics["mc1"] + metrics["mc2"]) / 2
    return metrics["exact_match"]


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def final_val_loss(history: Any) -> float:
    validation = history.validation if hasattr(history, "validation") else history["validation"]
    return float(validation[-1]["val_loss"]) if validation else float("nan")


# ------------------------------------------------------------------------------------ units
def unit_zero_shot(h: Harness, name: str, fold: int) -> dict[str, Any]:
    model, tok = h.base()
    return {"method": "0-shot", "test": h.evaluate(model, tok, name, fold, "test"), "trainable_params": 0}


def unit_select(h: Harness, name: str, fold: int, seed: int) -> dict[str, Any]:
    """LoFiT step 1 (scale A on every head, L1) -> the full head ranking."""
    task = h.task(name, fold)
    model, tok = h.base()
    selection = select_heads(
        model,
        tok,
        h.split(name, fold, "train"),
        method="lofit",
        objective=task.objective,
        l1=float(task.defaults["l1"]),
        **h.train_kwargs(float(task.defaults["lr_select"]), seed),
    )
    return {
        "method": "lofit-select",
        "seed": seed,
        "l1": float(task.defaults["l1"]),
        "lr": float(task.defaults["lr_select"]),
        "scores": selection.scores.tolist(),
        "ranking": [list(x) for x in selection.ranking],
        "train_wall_s": (selection.history or {}).get("summary", {}).get("elapsed_s"),
    }


def activations_and_labels(h: Harness, name: str, fold: int, model: nn.Module, tok: Any) -> dict[str, Any]:
    """Last-token head outputs of true/false texts built from train and val records (ITI's data)."""
    task = h.task(name, fold)
    train, val = h.split(name, fold, "train"), h.split(name, fold, "val")
    positives, negatives = probe_texts(train + val, task.objective, h.settings.sample_seed)
    acts = head_activations_at_last_token(
        model, tok, positives + negatives, batch_size=h.settings.eval_batch_size
    )
    labels = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))]).long()
    is_train = torch.tensor([i < len(train) for i in range(len(positives))] * 2)
    return {"acts": acts, "labels": labels, "is_train": is_train}


def probe_selection(acts: dict[str, Any]) -> HeadSelection:
    x, y, is_train = acts["acts"], acts["labels"], acts["is_train"]
    scores = probe_head_scores(x[is_train], y[is_train], x[~is_train], y[~is_train])
    return HeadSelection(scores.val_accuracy, rank_heads(scores.val_accuracy, scores.val_loss), "probe")


def unit_iti(h: Harness, name: str, fold: int) -> dict[str, Any]:
    """ITI: probe-ranked heads, mass-mean shift α·σ·u at every position; α chosen on validation."""
    model, tok = h.base()
    with h.autocast():
        acts = activations_and_labels(h, name, fold, model, tok)
    selection = probe_selection(acts)
    directions = mass_mean_directions(acts["acts"], acts["labels"])
    heads = selection.top(h.settings.iti_k)
    wrapped = None
    search: list[dict[str, Any]] = []
    for alpha in h.settings.iti_alphas:
        offsets = iti_offsets(directions.directions, directions.sigmas, heads, alpha)
        wrapped = apply_iti(wrapped if wrapped is not None else model, offsets)
        val = h.evaluate(wrapped, tok, name, fold, "val_eval")
        search.append({"alpha": alpha, "val": val, "val_score": main_metric(name, val)})
    best = max(search, key=lambda r: r["val_score"])
    offsets = iti_offsets(directions.directions, directions.sigmas, heads, best["alpha"])
    assert wrapped is not None
    wrapped = apply_iti(wrapped, offsets)
    test = h.evaluate(wrapped, tok, name, fold, "test")
    torch.save({k: v for k, v in offsets.items()}, h.work_dir / f"iti_{name}{fold}.pt")
    return {
        "method": "ITI",
        "k": selection.count(h.settings.iti_k),
        "alpha": best["alpha"],
        "search": search,
        "test": test,
        "trainable_params": 0,
        "probe_scores": selection.scores.tolist(),
        "probe_ranking": [list(x) for x in selection.ranking],
    }


def depth_layers(fractions: Sequence[float], num_layers: int) -> list[int]:
    """Layer indices at the given fractions of the depth (distinct, in order)."""
    return sorted({min(int(f * num_layers), num_layers - 1) for f in fractions})


def unit_repe(h: Harness, name: str, fold: int) -> dict[str, Any]:
    """RepE: reading (TruthfulQA) or contrast vector (SFT tasks) at one layer, layer and α on validation."""
    from lofit.baselines.repe import (
        RepeShift,
        apply_repe,
        contrast_vector,
        reading_vector,
        residual_at_last_token,
        residual_scale,
    )

    task = h.task(name, fold)
    model, tok = h.base()
    positives, negatives = probe_texts(h.split(name, fold, "train"), task.objective, h.settings.sample_seed)
    with h.autocast():
        pos = residual_at_last_token(model, tok, positives, batch_size=h.settings.eval_batch_size)
        neg = residual_at_last_token(model, tok, negatives, batch_size=h.settings.eval_batch_size)
    kind = "reading" if task.objective == "dpo" else "contrast"
    directions = reading_vector(pos, neg) if kind == "reading" else contrast_vector(pos, neg)
    scales = residual_scale(torch.cat([pos, neg]))
    wrapped: Any = model
    search: list[dict[str, Any]] = []
    layers = depth_layers(h.settings.repe_layers or REPE_LAYERS, directions.shape[0])
    for layer in layers:
        for alpha in h.settings.repe_alphas or REPE_ALPHAS:
            wrapped = apply_repe(wrapped, RepeShift(layer, directions[layer], alpha, float(scales[layer])))
            val = h.evaluate(wrapped, tok, name, fold, "val_eval")
            search.append({"layer": layer, "alpha": alpha, "val": val, "val_score": main_metric(name, val)})
    best = max(search, key=lambda r: r["val_score"])
    shift = RepeShift(best["layer"], directions[best["layer"]], best["alpha"], float(scales[best["layer"]]))
    wrapped = apply_repe(wrapped, shift)
    return {
        "method": "RepE",
        "vector": kind,
        "layer": best["layer"],
        "alpha": best["alpha"],
        "scale": shift.scale,
        "search": search,
        "test": h.evaluate(wrapped, tok, name, fold, "test"),
        "trainable_params": 0,
    }


def unit_loreft(h: Harness, name: str, fold: int) -> dict[str, Any]:
    """LoReFT at fixed layers/rank/positions (LOREFT_SHAPE), lr from the grid by validation loss."""
    from lofit.baselines.loreft import get_loreft_model

    task = h.task(name, fold)
    if task.eval_task != "exact_match":
        raise NotImplementedError(
            f"LoReFT needs each scored sequence's prompt boundary; {task.eval_task} scoring builds its prompts "
            "inside the evaluator, so only generation-scored tasks are supported here"
        )
    shape = LOREFT_SHAPE

    def train_one(lr: float) -> tuple[nn.Module, Any, Any]:
        base, tok = h.base()
        seed_everything(h.train_kwargs(lr)["seed"])
        layers = depth_layers(shape["layers"], len(find_output_projections(base).sites))
        model = get_loreft_model(base, layers, shape["rank"], shape["first"], shape["last"])
        prompts = [r["prompt"] for split in ("train", "val", "test") for r in h.split(name, fold, split)]
        model.register_prompts(tok, prompts)
        return model, tok, train_baseline(h, name, fold, model, tok, lr)

    model, tok, search, lr = lr_search(h, h.settings.loreft_lrs or LOREFT_LRS, train_one)
    return {
        "method": "LoReFT",
        **shape,
        "layer_indices": list(model.layer_indices),
        "lr": lr,
        "search": search,
        "test": h.evaluate(model, tok, name, fold, "test"),
        "trainable_params": sum(p.numel() for p in trainable_parameters(model)),
    }


def heads_for(
    h: Harness, name: str, fold: int, source: str, k: float, seed: int = 42
) -> dict[int, list[int]]:
    """Top-k heads from LoFiT selection (`source`="lofit" or another task's name), probe or random."""
    if source == "random":
        model, tok = h.base()
        train = h.split(name, fold, "train")[:2]
        task = h.task(name, fold)
        selection = select_heads(model, tok, train, method="random", objective=task.objective, seed=seed)
        return selection.top(k)
    if source == "probe":
        unit = h.get(f"iti/{name}/f{fold}")
        if unit is None:
            raise RuntimeError(f"probe heads need the ITI unit of {name} first")
        scores = torch.tensor(unit["probe_scores"])
        ranking = [tuple(x) for x in unit["probe_ranking"]]
        return HeadSelection(scores, ranking, "probe").top(k)
    task_name = name if source == "lofit" else source
    task_fold = fold if source == "lofit" else 0
    unit = ensure_selection(h, task_name, task_fold, seed)
    scores = torch.tensor(unit["scores"])
    return HeadSelection(scores, [tuple(x) for x in unit["ranking"]], "lofit").top(k)


def ensure_selection(h: Harness, name: str, fold: int, seed: int = 42) -> dict[str, Any]:
    unit_id = f"select/{name}/f{fold}/s{seed}"
    result = h.run(unit_id, lambda: unit_select(h, name, fold, seed))
    if result is None:
        raise BudgetSpent(unit_id)
    return result


class BudgetSpent(RuntimeError):
    """A unit's dependency could not start because the budget is spent."""


def lr_search(
    h: Harness, lrs: Sequence[float], train_one: Callable[[float], tuple[nn.Module, Any, Any]]
) -> tuple[nn.Module, Any, list[dict[str, Any]], float]:
    """Train once per learning rate; keep the model with the lowest final validation loss."""
    best: tuple[float, nn.Module, Any, float] | None = None
    search = []
    for lr in lrs:
        model, tok, history = train_one(lr)
        loss = final_val_loss(history)
        elapsed = (history.summary if hasattr(history, "summary") else history["summary"])["elapsed_s"]
        search.append({"lr": lr, "val_loss": loss, "train_s": round(float(elapsed), 1)})
        if best is None or loss < best[0]:
            best = (loss, model, tok, lr)
    assert best is not None
    return best[1], best[2], search, best[3]


def train_lofit(
    h: Harness, name: str, fold: int, heads: dict[int, list[int]], lrs: Sequence[float]
) -> tuple[nn.Module, dict[str, Any]]:
    """LoFiT step 2 on `heads` for each learning rate of `lrs`; the model with the lowest validation
    loss, its test metrics, and the search (the result fields every LoFiT unit shares)."""
    task = h.task(name, fold)

    def train_one(lr: float) -> tuple[nn.Module, Any, Any]:
        base, tok = h.base()
        model = train_offsets(
            base,
            tok,
            h.split(name, fold, "train"),
            heads,
            objective=task.objective,
            val_data=h.val_data(name, fold),
            **h.train_kwargs(lr),
        )
        return model, tok, h.finish_validation(model, tok, name, fold, model.training_history)

    model, tok, search, lr = lr_search(h, lrs, train_one)
    result = {
        "k": sum(len(v) for v in heads.values()),
        "heads": {str(layer): v for layer, v in heads.items()},
        "lr": lr,
        "search": search,
        "test": h.evaluate(model, tok, name, fold, "test"),
        "trainable_params": sum(p.numel() for p in trainable_parameters(model)),
    }
    return model, result


def unit_lofit(h: Harness, name: str, fold: int, k: float, source: str = "lofit") -> dict[str, Any]:
    """LoFiT step 2: offsets on the top-k heads from `source`; lr chosen on validation loss."""
    heads = heads_for(h, name, fold, source, k)
    # The lr grid is searched once per task/fold, on LoFiT with the large K and its own heads; every
    # other LoFiT unit of that task reuses the chosen lr (the CPU budget allows no search per unit).
    tuned = h.get(f"lofit/{name}/f{fold}/k{h.settings.k_large}/lofit")
    if k == h.settings.k_large and source == "lofit":
        lrs, lr_from = list(h.settings.lofit_lrs), "searched here"
    elif tuned is not None:
        lrs, lr_from = [float(tuned["lr"])], f"chosen by lofit/{name}/f{fold}/k{h.settings.k_large}/lofit"
    else:
        lrs, lr_from = list(h.settings.lofit_lrs[:1]), "first grid value (the tuned unit did not run)"
    model, result = train_lofit(h, name, fold, heads, lrs)
    if name == "truthfulqa" and fold == 0 and source == "lofit":
        torch.save({"heads": heads, "state": trained_state(model)}, h.work_dir / f"lofit_{name}{fold}_{k}.pt")
    return {"method": f"LoFiT ({source} heads)", **result, "lr_from": lr_from}


def expose_for_trainer(model: nn.Module) -> nn.Module:
    """Give a peft/RED model the one method `train_adapter` needs besides forward (its trainable params)."""
    params = trainable_parameters(model)
    object.__setattr__(model, "adapter_parameters", lambda *args, **kwargs: params)
    return model


def train_baseline(h: Harness, name: str, fold: int, model: nn.Module, tok: Any, lr: float) -> Any:
    """The trainer's loop (objective, AdamW, linear schedule, clipping) on a peft/RED model."""
    task = h.task(name, fold)
    config = TrainingConfig(**h.train_kwargs(lr))
    objective = make_objective(task.objective, tok, config.max_length, config.beta)
    train = objective.encode(h.split(name, fold, "train"))
    val_records = h.val_data(name, fold)
    val = objective.encode(val_records) if val_records else None
    seed_everything(config.seed)
    trainee: Any = expose_for_trainer(model)  # duck-typed: train_adapter is annotated for LofitModel
    history = train_adapter(trainee, objective, train, config, val_examples=val, description="baseline")
    return h.finish_validation(model, tok, name, fold, history)


def unit_peft_like(h: Harness, name: str, fold: int, method: str) -> dict[str, Any]:
    """LoRA (r=8, α=8, dropout 0.1 on q/v via peft) or RED (scale+bias on attention outputs)."""

    def train_one(lr: float) -> tuple[nn.Module, Any, Any]:
        base, tok = h.base()
        seed_everything(h.train_kwargs(lr)["seed"])  # LoRA's A init (42 unless a subclass reseeds)
        model = get_lora_model(base) if method == "lora" else get_red_model(base, site="attention")
        history = train_baseline(h, name, fold, model, tok, lr)
        return model, tok, history

    lrs = h.settings.lora_lrs if method == "lora" else h.settings.red_lrs
    model, tok, search, lr = lr_search(h, lrs, train_one)
    test = h.evaluate(model, tok, name, fold, "test")
    if name == "truthfulqa" and fold == 0 and method == "lora":
        torch.save(trained_state(model), h.work_dir / f"lora_{name}{fold}.pt")
    return {
        "method": "LoRA" if method == "lora" else "RED",
        "lr": lr,
        "search": search,
        "test": test,
        "trainable_params": sum(p.numel() for p in trainable_parameters(model)),
    }


def unit_ood(h: Harness, method: str) -> dict[str, Any]:
    """0-shot log-likelihood accuracy on ARC-Easy, PIQA, OpenBookQA of a model trained on TruthfulQA."""
    base, tok = h.base()
    model: nn.Module = base
    source = ""
    if method == "iti":
        path = h.work_dir / "iti_truthfulqa0.pt"
        model = apply_iti(base, torch.load(path))
        source = str(path)
    elif method == "lofit":
        path = h.work_dir / f"lofit_truthfulqa0_{h.settings.k_large}.pt"
        saved = torch.load(path)
        model = get_lofit_model(
            base, LofitConfig(heads=saved["heads"], use_scale=False, use_offset=True, init_std=0.0)
        )
        load_state(model, saved["state"])
        source = str(path)
    elif method == "lora":
        path = h.work_dir / "lora_truthfulqa0.pt"
        model = get_lora_model(base)
        load_state(model, torch.load(path))
        source = str(path)
    model.eval()
    scores = {}
    for bench in OOD_SETS:
        records = sample(load_mc_split(bench, "test"), h.settings.max_ood, h.settings.sample_seed)
        with h.autocast(), torch.no_grad():
            metrics = evaluate(
                model, tok, "mc", records, batch_size=h.settings.eval_batch_size, progress=False
            )
        scores[bench] = metrics
    return {"method": method, "test": scores, "adapter": source}


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise KeyError(f"saved adapter parameters {missing[:3]} do not exist in the rebuilt model")
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value)


# ------------------------------------------------------------------------------------ plan
def plan(
    h: Harness, tasks: Sequence[str], folds: Sequence[int], stages: Sequence[str]
) -> list[tuple[str, Callable[[], Any]]]:
    """(unit id, runner) in priority order."""
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
        for name in names if fold == 0 else []:  # RepE on fold 0 only (TruthfulQA fold 1: not planned)
            add(f"repe/{name}/f{fold}", unit_repe, name, fold)

    if "table1" in stages:
        table1(0)
    if "table3" in stages:
        if "table1" not in stages:
            adapters("lora")
        adapters("red")
        for name in tasks:
            if name != "truthfulqa":  # see unit_loreft
                add(f"loreft/{name}/f0", unit_loreft, name, 0)
    if "table2" in stages:
        for name in tasks:
            sources = ["random", "probe"] + ([OTHER_TASK[name]] if OTHER_TASK[name] in tasks else [])
            for source in sources:
                add(
                    f"lofit/{name}/f0/k{s.k_small}/{source}",
                    unit_lofit,
                    name,
                    0,
                    s.k_small,
                    source,
                )
    if "stability" in stages:
        for name in tasks:
            add(f"select/{name}/f0/s{SEEDS[1]}", unit_select, name, 0, SEEDS[1])
    if "ood" in stages and "truthfulqa" in tasks:
        for method in ("base", "iti", "lofit", "lora"):
            add(f"ood/{method}", unit_ood, method)
    if "table1" in stages and 1 in folds and "truthfulqa" in tasks:
        table1(1)
    return steps


# ------------------------------------------------------------------------------------ main
def environment() -> dict[str, Any]:
    import peft
    import transformers

    from lofit import _version

    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {
        "machine": f"{platform.node()} {platform.machine()} {cpu}",
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lofit": _version.__version__,
    }


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
        default=["table1", "table3", "table2", "stability", "ood"],
        choices=["table1", "table3", "table2", "stability", "ood"],
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
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for paper_tables.*")
    parser.add_argument("--work-dir", type=Path, default=None, help="trained adapters for the OOD units")
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace) -> Settings:
    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    scalars = ("max_train", "max_val", "max_test", "max_ood", "epochs", "precision", "model", "max_length")
    for name in (*scalars, "k_small", "k_large", "lofit_lrs", "lora_lrs", "red_lrs", "iti_alphas"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return Settings(**values)


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
    work_dir = args.work_dir or args.out / f".{stem}_work"
    work_dir.mkdir(parents=True, exist_ok=True)
    harness = Harness(settings, results_path, work_dir, deadline)
    command = "python benchmarks/paper_tables.py " + " ".join(argv if argv is not None else sys.argv[1:])
    runs = harness.results.setdefault("runs", [])
    runs.append({"command": command.strip(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), **environment()})
    harness.save()
    torch.manual_seed(0)
    for unit, step in plan(harness, args.tasks, args.folds, args.stages):
        if harness.done(unit):
            continue
        try:
            step()
        except BudgetSpent as error:
            print(f"[paper] budget spent before dependency {error} of {unit}", flush=True)
        except FileNotFoundError as error:  # an OOD unit whose adapter was never trained
            harness.results["units"][unit] = {"error": str(error)}
            harness.save()
    runs[-1]["wall_s"] = round(time.time() - harness.started, 1)
    runs[-1]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    harness.save()
    text = render_markdown(harness.results, args.tasks, heatmap_dir, quick=args.quick, notes=notes)
    atomic_write_text(args.out / f"{stem}.md", text)
    print(f"[paper] wrote {args.out / (stem + '.md')} and {harness.results_path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
