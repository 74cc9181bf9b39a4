"""The pipeline's steps, shared by `lofit run` and the `select`/`train`/`eval` subcommands."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .atomic import atomic_write_json
from .pipeline import RunOptions, training_kwargs


@dataclass
class PreparedData:
    task: Any  # lofit.tasks.Task
    train: list[dict[str, Any]]
    val: list[dict[str, Any]] | None
    val_eval: list[dict[str, Any]]
    test: list[dict[str, Any]]


def _first(records: Any, limit: int | None) -> list[dict[str, Any]]:
    records = list(records or [])
    return records if limit is None else records[:limit]


def prepare_data(options: RunOptions) -> PreparedData:
    from .tasks import load_task

    task = load_task(
        options.task,
        data_dir=options.data_dir,
        fold=options.fold,
        seed=options.seed,
        train_file=options.train_file,
        val_file=options.val_file,
        test_file=options.test_file,
    )
    return PreparedData(
        task=task,
        train=_first(task.train, options.max_train),
        val=_first(task.val, options.max_val) or None,
        val_eval=_first(getattr(task, "val_eval", None), options.max_val),
        test=_first(task.test, options.max_test),
    )


def load(options: RunOptions) -> tuple[nn.Module, Any, float]:
    from .loading import load_model

    start = time.perf_counter()
    model, tokenizer = load_model(
        options.model, device_map=options.device_map, quantization=options.quantization
    )
    return model, tokenizer, time.perf_counter() - start


def default_k(options: RunOptions, data: PreparedData) -> float | int:
    return options.k if options.k is not None else data.task.defaults.get("k", 0.1)


def check_k(k: float | int, model: nn.Module) -> None:
    """Fail on a k this model cannot take before training, not after it."""
    import torch

    from .heads import find_output_projections
    from .selection import HeadSelection, rank_heads

    geometry = find_output_projections(model)
    scores = torch.zeros(geometry.num_layers, geometry.num_heads)
    HeadSelection(scores, rank_heads(scores), "check").count(k)


def run_selection(options: RunOptions, data: PreparedData, model: nn.Module, tokenizer: Any) -> Any:
    from .selection import select_heads

    check_k(default_k(options, data), model)
    out = Path(options.out)
    selection = select_heads(
        model,
        tokenizer,
        data.train,
        method=options.select_method,
        objective=data.task.objective,
        val_data=data.val,
        output_dir=str(out / "select"),
        **training_kwargs(options, data.task.defaults, "select"),
    )
    selection.save(out / "heads.json")
    selection.plot(out / "heads.png", k=default_k(options, data))
    return selection


def run_training(
    options: RunOptions, data: PreparedData, model: nn.Module, tokenizer: Any, heads: dict[int, list[int]]
) -> Any:
    from .tuning import train_offsets

    out = Path(options.out)
    lofit_model = train_offsets(
        model,
        tokenizer,
        data.train,
        heads=heads,
        objective=data.task.objective,
        val_data=data.val,
        output_dir=str(out / "train"),
        **training_kwargs(options, data.task.defaults, "train"),
    )
    lofit_model.save_pretrained(out / "adapter")
    return lofit_model


def evaluation_kwargs(data: PreparedData, batch_size: int, progress: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"batch_size": batch_size, "progress": progress, **data.task.eval_options}
    if data.task.extraction is not None:
        kwargs["extraction"] = data.task.extraction
    if data.task.eval_task == "exact_match" and data.task.max_new_tokens is not None:
        kwargs["max_new_tokens"] = data.task.max_new_tokens
    return kwargs


def check_output_dir(out: Path) -> None:
    """Fail at once, not after training, when the output directory cannot be written."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise OSError(
            error.errno, f"cannot write to the output directory {out}: {error.strerror}; choose another --out"
        ) from None


def select_step(options: RunOptions) -> Any:
    check_output_dir(Path(options.out))
    data = prepare_data(options)
    model, tokenizer, _ = load(options)
    return run_selection(options, data, model, tokenizer)


def train_step(options: RunOptions, heads_file: Path) -> Any:
    from .selection import HeadSelection

    check_output_dir(Path(options.out))
    selection = HeadSelection.load(heads_file)
    data = prepare_data(options)
    heads = selection.top(default_k(options, data))
    model, tokenizer, _ = load(options)
    from .heads import find_output_projections

    geometry = find_output_projections(model)
    if (selection.num_layers, selection.num_heads) != (geometry.num_layers, geometry.num_heads):
        raise ValueError(
            f"{heads_file}: this head selection is for a model with {selection.num_layers} layers x "
            f"{selection.num_heads} heads, but {options.model} has {geometry.num_layers} x {geometry.num_heads}; "
            "select heads on this model first (lofit select)"
        )
    return run_training(options, data, model, tokenizer, heads)


def eval_step(
    options: RunOptions, adapter: Path | None, split: str, batch_size: int, out: Path | None
) -> dict[str, float]:
    from .evaluation import evaluate
    from .model import LofitModel

    data = prepare_data(options)
    model, tokenizer, _ = load(options)
    if adapter is not None:
        model = LofitModel.from_pretrained(model, adapter)
    records = data.test if split == "test" else data.val_eval
    model.eval()
    metrics: dict[str, float] = evaluate(
        model,
        tokenizer,
        data.task.eval_task,
        records,
        **evaluation_kwargs(data, batch_size, options.progress),
    )
    if out is not None:
        atomic_write_json(out, {"task": data.task.name, "split": split, "adapter": str(adapter), **metrics})
    return metrics
