"""`lofit run`: select heads -> train offsets -> evaluate base and adapted model -> write artefacts."""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .atomic import atomic_write_json


@dataclass
class RunOptions:
    """Everything `lofit run` needs; `None` means the task's default."""

    task: str
    out: Path
    model: str = "smollm2-135m"
    train_file: str | None = None
    val_file: str | None = None
    test_file: str | None = None
    data_dir: str | None = None
    fold: int = 0
    k: float | None = None
    select_method: str = "lofit"
    epochs: int | None = None
    batch_size: int | None = None
    lr_select: float | None = None
    lr_train: float | None = None
    l1: float | None = None
    beta: float | None = None
    seed: int = 42
    max_train: int | None = None
    max_val: int | None = None
    max_test: int | None = None
    max_length: int | None = None
    precision: str = "auto"
    eval_batch_size: int = 8
    progress: bool = True
    checkpoint_every: int = 0
    resume: bool = False
    gradient_checkpointing: bool = False
    target_modules: list[str] | None = None
    device_map: str | None = None
    quantization: str | None = None


def parse_k(value: str | float | int) -> float | int:
    """`--k 27` (heads) or `--k 0.1` (fraction of all heads)."""
    import argparse
    import math

    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(
            f"--k {value}: give a number of heads (1, 2, ...) or a fraction of all heads in (0, 1]"
        )
    if number.is_integer() and number >= 1:
        return int(number)
    return number


def resolved_precision(precision: str) -> str:
    from .trainer import fastest_precision

    return fastest_precision() if precision == "auto" else precision


def training_kwargs(options: RunOptions, defaults: dict[str, Any], step: str) -> dict[str, Any]:
    """Keyword arguments for select_heads (step "select") or train_offsets (step "train")."""
    lr = options.lr_select if step == "select" else options.lr_train
    kwargs: dict[str, Any] = {
        "epochs": options.epochs if options.epochs is not None else defaults.get("epochs", 5),
        "batch_size": options.batch_size if options.batch_size is not None else defaults.get("batch_size", 8),
        "lr": lr if lr is not None else defaults.get(f"lr_{step}"),
        "seed": options.seed,
        "precision": resolved_precision(options.precision),
        "progress": options.progress,
    }
    if step == "select":
        kwargs["l1"] = options.l1 if options.l1 is not None else defaults.get("l1")
    beta = options.beta if options.beta is not None else defaults.get("beta")
    if beta is not None:
        kwargs["beta"] = beta
    if options.max_length is not None:
        kwargs["max_length"] = options.max_length
    if options.checkpoint_every:
        kwargs["checkpoint_every"] = options.checkpoint_every
    if options.resume:
        kwargs["resume"] = True
    if options.gradient_checkpointing:
        kwargs["gradient_checkpointing"] = True
    if options.target_modules:
        kwargs["target_modules"] = list(options.target_modules)
    return {key: value for key, value in kwargs.items() if value is not None}


def environment() -> dict[str, str]:
    import transformers

    return {
        "lofit": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "command": " ".join(sys.argv),
    }


def validation_losses(history: dict[str, Any] | None) -> list[list[float]]:
    """[[epoch, validation loss], ...] from a `TrainingHistory.to_dict()` (empty without validation data)."""
    records = (history or {}).get("validation", [])
    return [[record["epoch"], record["val_loss"]] for record in records if "val_loss" in record]


def run(options: RunOptions) -> dict[str, Any]:
    """Run the whole LoFiT pipeline and write DIR/{metrics.json, heads.json, heads.png, adapter/, report.md}."""
    from .evaluation import evaluate
    from .report import write_report
    from .steps import (
        check_output_dir,
        default_k,
        evaluation_kwargs,
        load,
        prepare_data,
        run_selection,
        run_training,
    )

    out = Path(options.out)
    check_output_dir(out)
    data = prepare_data(options)
    model, tokenizer, load_seconds = load(options)
    timings: dict[str, float] = {"load_model_s": load_seconds}

    start = time.perf_counter()
    selection = run_selection(options, data, model, tokenizer)
    timings["select_heads_s"] = time.perf_counter() - start
    k = default_k(options, data)
    heads = selection.top(k)

    start = time.perf_counter()
    lofit_model = run_training(options, data, model, tokenizer, heads)
    timings["train_offsets_s"] = time.perf_counter() - start

    eval_kwargs = evaluation_kwargs(data, options.eval_batch_size, options.progress)
    lofit_model.eval()
    start = time.perf_counter()
    with lofit_model.disable_adapter():
        base_metrics = evaluate(lofit_model, tokenizer, data.task.eval_task, data.test, **eval_kwargs)
    timings["eval_base_s"] = time.perf_counter() - start
    start = time.perf_counter()
    lofit_metrics = evaluate(lofit_model, tokenizer, data.task.eval_task, data.test, **eval_kwargs)
    timings["eval_lofit_s"] = time.perf_counter() - start

    metrics: dict[str, Any] = {
        "task": data.task.name,
        "eval_task": data.task.eval_task,
        "model": options.model,
        "base": base_metrics,
        "lofit": lofit_metrics,
        "heads": [[layer, head] for layer, layer_heads in heads.items() for head in layer_heads],
        "num_heads_selected": sum(len(h) for h in heads.values()),
        "total_heads": lofit_model.geometry.total_heads,
        "trainable_params": sum(p.numel() for p in lofit_model.adapter_parameters()),
        "counts": {"train": len(data.train), "val": len(data.val or []), "test": len(data.test)},
        "settings": {
            "select": training_kwargs(options, data.task.defaults, "select")
            | {"method": options.select_method},
            "train": training_kwargs(options, data.task.defaults, "train"),
            "k": k,
            "fold": options.fold if data.task.name == "truthfulqa" else None,
        },
        "validation": {
            "select": validation_losses(selection.history),
            "train": validation_losses(lofit_model.training_history.to_dict()),
        },
        "timings": timings,
        "environment": environment(),
    }
    atomic_write_json(out / "metrics.json", metrics)
    write_report(out, metrics)
    return metrics
