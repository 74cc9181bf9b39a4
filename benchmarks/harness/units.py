"""The shared harness of the accuracy benchmarks: `Settings` (their hash keys the unit cache), seeded data
subsets, and the `Harness` that runs cached, resumable units and keeps the results JSON up to date.

Used by `benchmarks.paper`, `benchmarks.curves` and `benchmarks.composition`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lofit import evaluate, load_model
from lofit.tasks import load_task
from lofit.training import TokenScorer, make_objective

from .internals import OutputLockedError, atomic_write_json, mean_loss, output_lock
from .stats import sample

TASKS = ("truthfulqa", "mquake", "clutrr")
OOD_SETS = ("arc_easy", "piqa", "openbookqa")
OTHER_TASK = {"truthfulqa": "mquake", "mquake": "clutrr", "clutrr": "truthfulqa"}
SEEDS = (42, 12450)
# Offsets on every head (270 here) at the lr tuned for 10% of them diverged on MQuAKE (final validation
# loss 7.0-7.7 vs 2.4; EM 0): training on all heads searches lr / 25, lr / 5 and lr by validation loss.
ALL_HEADS_LR_DIVISORS = (25.0, 5.0, 1.0)
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
    # Another results file whose head choices (the units `is_borrowed` names: selections, probes, the tuned lr)
    # this run uses instead of running its own, e.g. a --precision fp32 run of Table 2 on a machine where
    # bf16 is emulated, on the heads of the bf16 run. None keeps the cache keys of earlier runs.
    heads_from: str | None = None

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


# The settings that must agree with the other file's (the data the heads were chosen on); precision may not.
BORROW_FIELDS = (
    "model",
    "max_train",
    "max_val",
    "max_test",
    "epochs",
    "batch_size",
    "sample_seed",
    "max_length",
    "k_large",
)


def is_borrowed(unit: str, k_large: float) -> bool:
    """Whether a `heads_from` run takes `unit` from the other file.

    Example:
        >>> [is_borrowed(u, 0.1) for u in ("select/clutrr/f0/s42", "lofit/clutrr/f0/k0.1/lofit",
        ...                                "lofit/clutrr/f0/k0.03/lofit", "bias_select/clutrr/f0")]
        [True, True, False, False]
    """
    if unit.startswith(("select/", "iti/")):
        return True
    parts = unit.split("/")
    return len(parts) == 5 and parts[0] == "lofit" and parts[3] == f"k{k_large}" and parts[4] == "lofit"


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


# ------------------------------------------------------------------------------------ harness
@contextlib.contextmanager
def waiting_lock(path: Path, timeout_s: float = 120.0) -> Any:
    """lofit's output lock on `path`, waited for (a save holds it for milliseconds) rather than refused."""
    deadline = time.monotonic() + timeout_s
    with contextlib.ExitStack() as stack:
        while True:
            try:
                stack.enter_context(output_lock(path))
                break
            except OutputLockedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield


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
        self.borrowed = self._load_borrowed()
        self.held_elsewhere: dict[str, str] = {}  # unit -> the run holding its claim (see `run`)

    # ------------------------------------------------------------------------ bookkeeping
    def _load_results(self) -> dict[str, Any]:
        fresh: dict[str, Any] = {"settings": asdict(self.settings), "units": {}, "runs": []}
        if not self.results_path.is_file():
            return fresh
        data = json.loads(self.results_path.read_text(encoding="utf-8"))
        self.results = fresh
        self._take_in(data, announce=True)
        return fresh

    def save(self) -> None:
        """Write the results file, first taking in (under a lock) the units another run on the same file
        wrote meanwhile, so that two runs on one `--out` never drop each other's results."""
        with waiting_lock(self.results_path):
            if self.results_path.is_file():
                self._take_in(json.loads(self.results_path.read_text(encoding="utf-8")))
            atomic_write_json(self.results_path, self.results)

    def _take_in(self, data: dict[str, Any], announce: bool = False) -> None:
        """Add the units and runs of `data` (a results file) that `self.results` lacks.

        Units of other settings are kept (under "superseded", never lost by a run with new settings) and
        come back into use when a later run's settings match theirs again.
        """
        units, superseded = self.results["units"], self.results.get("superseded", {})
        stored = [*data.get("units", {}).items(), *data.get("superseded", {}).values()]
        for unit, result in stored:
            key = result.get("settings_key") or settings_key(data.get("settings", {}), unit)
            if key == self.settings.key(unit):
                units.setdefault(unit, {**result, "settings_key": key})
            elif f"{unit}@{key}" not in superseded:
                superseded[f"{unit}@{key}"] = (unit, {**result, "settings_key": key})
                if announce:
                    print(f"[paper] other settings: keeping {unit} aside (not used by this run)", flush=True)
        if superseded:
            self.results["superseded"] = superseded
        known = {(run.get("command"), run.get("started")) for run in self.results["runs"]}
        others = [
            run for run in data.get("runs", []) if (run.get("command"), run.get("started")) not in known
        ]
        self.results["runs"].extend(others)
        self.results["runs"].sort(key=lambda run: run.get("started", ""))

    def _load_borrowed(self) -> dict[str, Any]:
        """The units a `heads_from` run takes from the other file (those of that file's own settings)."""
        source = self.settings.heads_from
        if source is None:
            return {}
        path = Path(source)
        if not path.is_file():
            raise SystemExit(f"--heads-from: no results file at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            theirs = Settings(**data["settings"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise SystemExit(
                f"--heads-from {path}: not a paper_tables results file ({type(error).__name__}: {error}); "
                "pass the paper_tables.json of the run whose heads to use"
            ) from None
        differ = [f for f in BORROW_FIELDS if getattr(theirs, f) != getattr(self.settings, f)]
        if differ:
            pairs = ", ".join(
                f"{f} {getattr(theirs, f)!r} there, {getattr(self.settings, f)!r} here" for f in differ
            )
            raise SystemExit(
                f"--heads-from {path}: its heads were chosen on other data ({pairs}); match them"
            )
        return {
            unit: result
            for unit, result in data.get("units", {}).items()
            if is_borrowed(unit, self.settings.k_large)
            and (result.get("settings_key") or settings_key(data["settings"], unit)) == theirs.key(unit)
        }

    def done(self, unit: str) -> bool:
        return unit in self.results["units"] or unit in self.borrowed

    def get(self, unit: str) -> dict[str, Any] | None:
        return self.results["units"].get(unit) or self.borrowed.get(unit)

    def over_budget(self) -> bool:
        return time.time() > self.deadline

    def run(self, unit: str, fn: Callable[[], dict[str, Any]], claim: bool = False) -> dict[str, Any] | None:
        """Run `fn` unless `unit` is cached; store its result (with wall time) and save at once.

        With `claim`, a unit another live run on this work dir is running is skipped (None; its holder is
        in `held_elsewhere`), so two runs of one command split such units instead of doubling them.
        """
        if self.done(unit):
            return self.get(unit)
        if self.settings.heads_from is not None and is_borrowed(unit, self.settings.k_large):
            raise RuntimeError(
                f"{unit} is not in {self.settings.heads_from}: a --heads-from run takes it from there"
            )
        if self.over_budget():
            print(f"[paper] budget spent: not starting {unit}", flush=True)
            return None
        with contextlib.ExitStack() as stack:
            if claim:
                holder = self._claim(unit)
                if holder is not None:
                    self.held_elsewhere[unit] = holder
                    print(f"[paper] {unit} is being run by {holder}: skipped here", flush=True)
                    return None
                stack.callback(self._claim_path(unit).unlink, missing_ok=True)
            return self._run_now(unit, fn)

    def _run_now(self, unit: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
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

    def _claim_path(self, unit: str) -> Path:
        return self.work_dir / "claims" / (unit.replace("/", "+") + ".claim")

    def _claim(self, unit: str) -> str | None:
        """Take `unit`'s claim file (None), or say who holds it ("pid N on host"). A claim of a process
        of this host that is no longer alive (a killed run) is taken over."""
        path = self._claim_path(unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        me = f"pid {os.getpid()} on {socket.gethostname()}"
        with waiting_lock(path.parent / "claims"):  # one claimant at a time: no two take a stale claim
            if path.is_file():
                holder = path.read_text(encoding="utf-8").strip()
                if holder != me and not _claim_is_stale(holder):
                    return holder
            path.write_text(me, encoding="utf-8")
        return None

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


def _claim_is_stale(holder: str) -> bool:
    """Whether a claim ("pid N on host") was left by a process of this host that has ended.

    Example:
        >>> _claim_is_stale(f"pid {os.getpid()} on {socket.gethostname()}")
        False
        >>> _claim_is_stale("pid 1 on another-host")  # another machine's run: not known to have ended
        False
    """
    words = holder.split()
    if len(words) != 4 or words[0] != "pid" or words[2] != "on" or not words[1].isdigit():
        return True  # not a claim this harness wrote (an empty file from a crash mid-write)
    if words[3] != socket.gethostname():
        return False
    try:
        os.kill(int(words[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


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
