"""The pipeline's steps, shared by `lofit run` and the `select` / `train` / `eval` / `merge` subcommands.

This is the command line's boundary: bad input that surfaces deeper down as a builtin error (a
`ValueError` from reading a heads file or an adapter, say) is re-raised here as a `LofitError` with the
same message, so the CLI reports it as the user's to fix (exit 2) and everything else as a bug (exit 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AdapterLoadError, LofitError, LofitRuntimeError, LofitValueError
from ..io.atomic import WRITE_ERRNOS, output_target, write_guard
from ..io.output_paths import (
    check_input_dir,
    check_no_links,
    check_output_apart,
    check_output_dir,
    is_hub_adapter,
)
from .inputs import ADAPTER_FILES, PreparedData, input_paths, load, load_adapter, load_selection, prepare_data
from .options import RunOptions

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from ..adapters.model import LofitModel
    from ..selection.ranking import HeadSelection

__all__ = [
    "PreparedData",
    "check_output_dir",
    "eval_step",
    "merge_step",
    "prepare_data",
    "select_step",
    "train_step",
    "training_kwargs",
]


# What `lofit select/train/run` write inside `--out` (training's `train_log.jsonl`, `loss_curve.png` and
# `checkpoints/` in `select/` and `train/`): none of them may be a symbolic link.
def _step_artefacts(step: str) -> tuple[str, ...]:
    return (step, *(f"{step}/{name}" for name in ("checkpoints", "train_log.jsonl", "loss_curve.png")))


ARTEFACTS = {
    "select": ("heads.json", "heads.png", *_step_artefacts("select")),
    "train": ("adapter", *_step_artefacts("train")),
}
ARTEFACTS["run"] = (*ARTEFACTS["select"], *ARTEFACTS["train"], "metrics.json", "report.md")
RUN_ARTEFACTS = ARTEFACTS["run"]


@contextlib.contextmanager
def guarded_output(options: RunOptions, **extra: Path | str | None) -> Iterator[None]:
    """Check `--out` of `run`/`select`/`train` before any work, and every write made in the block.

    `--out` must lie apart from every input (links resolved) and no artefact path in it may be a link; each
    write in the block is checked again (`lofit.io.atomic.write_guard`).

    Args:
        options: the command's options.
        extra: more inputs, e.g. `heads=...` (see `input_paths`).
    """
    inputs = input_paths(options, **extra)
    check_output_apart(options.out, inputs)
    check_no_links(options.out, ARTEFACTS.get(options.command, RUN_ARTEFACTS))
    with write_guard(inputs, root=options.out):
        yield


@contextlib.contextmanager
def values_are_user_errors() -> Iterator[None]:
    """Re-raise a plain `ValueError` from the training code as a `LofitValueError` with the same message.

    The trainer and objectives (another module's code) still check their inputs (record lengths, `max_length`,
    training options) with builtin `ValueError`s; inside a CLI step those are about the user's data or options.
    Other exception types stay what they are (bugs: exit 1).

    Example:
        >>> with values_are_user_errors():
        ...     raise ValueError("record 3 is too long")
        Traceback (most recent call last):
        ...
        lofit.errors.LofitValueError: record 3 is too long
    """
    try:
        yield
    except LofitError:
        raise
    except ValueError as error:
        raise LofitValueError(str(error)) from error


def resolve_k(options: RunOptions, data: PreparedData) -> float | int:
    """The k of this command: `--k`, else the task's default (`lofit.tasks.defaults`).

    The same for `run`, `select` and `train`.

    Args:
        options: the command's options.
        data: the prepared task data (its `task.defaults`).

    Returns:
        An int (heads) or a float fraction of all heads.
    """
    if options.k is not None:
        return options.k
    k = data.task.defaults["k"]
    if isinstance(k, str):
        raise LofitValueError(f"the task's default k must be a number, got {k!r}")
    return k


def resolve_select_method(options: RunOptions, data: PreparedData) -> str:
    """The head selector of this command: `--select-method`, else the task's default (`lofit.tasks.defaults`).

    Args:
        options: the command's options.
        data: the prepared task data (its `task.defaults`).

    Returns:
        A selector name of `lofit.selection.selectors`.
    """
    return options.select_method or str(data.task.defaults.get("select_method", "lofit"))


def resolved_precision(precision: str) -> str:
    """The concrete training precision: "auto" becomes the fastest one this machine runs.

    Args:
        precision: "auto", "fp32", "bf16" or "fp16".

    Returns:
        The precision name.
    """
    from ..training.settings import fastest_precision

    return fastest_precision() if precision == "auto" else precision


def training_kwargs(options: RunOptions, defaults: dict[str, Any], step: str) -> dict[str, Any]:
    """Keyword arguments for `select_heads` (step "select") or `train_offsets` (step "train").

    Args:
        options: the command's options (None fields take the task's default).
        defaults: the task's defaults (`Task.defaults`, from `lofit.tasks.defaults`).
        step: "select" or "train".

    Returns:
        The keyword arguments, without None values.
    """
    lr = options.lr_select if step == "select" else options.lr_train
    kwargs: dict[str, Any] = {
        "epochs": options.epochs if options.epochs is not None else defaults.get("epochs"),
        "batch_size": options.batch_size if options.batch_size is not None else defaults.get("batch_size"),
        "lr": lr if lr is not None else defaults.get(f"lr_{step}"),
        "seed": options.seed,
        "precision": resolved_precision(options.precision),
        "progress": options.progress,
        "l1": (options.l1 if options.l1 is not None else defaults.get("l1")) if step == "select" else None,
        "beta": options.beta if options.beta is not None else defaults.get("beta"),
        "max_length": options.max_length,
        "checkpoint_every": options.checkpoint_every or None,
        "resume": options.resume or None,
        "gradient_checkpointing": options.gradient_checkpointing or None,
        # exact and faster; selection adapts every layer from 0, so there is nothing below to cache
        "cache_lower_layers": {"auto": "auto", "on": True, "off": False}[options.cache_lower_layers]
        if step == "train"
        else None,
        "target_modules": list(options.target_modules) if options.target_modules else None,
    }
    return {key: value for key, value in kwargs.items() if value is not None}


def check_k(k: float | int, model: nn.Module, target_modules: list[str] | None) -> None:
    """Fail on a k this model cannot take before training, not after it (honouring `--target-modules`).

    Args:
        k: heads (int) or a fraction of all heads (float).
        model: the base model.
        target_modules: the `--target-modules` suffixes, or None for automatic detection.

    Raises:
        LofitValueError: naming `--k` and the model's number of heads.
    """
    import torch

    from ..adapters.heads import find_output_projections
    from ..selection.ranking import HeadSelection, rank_heads

    geometry = find_output_projections(model, target_modules=target_modules)
    scores = torch.zeros(geometry.num_layers, geometry.num_heads)
    try:
        HeadSelection(scores, rank_heads(scores), "check").count(k)
    except (TypeError, ValueError) as error:
        raise LofitValueError(f"--k {k}: {error}") from None


def run_selection(
    options: RunOptions, data: PreparedData, model: nn.Module, tokenizer: PreTrainedTokenizerBase
) -> HeadSelection:
    """Step 1: rank the heads; writes `out/heads.json` and `out/heads.png`.

    Args:
        options: the command's options.
        data: the prepared task data.
        model: the base model; tokenizer: its tokenizer.

    Returns:
        The `HeadSelection`.
    """
    from ..selection.select import select_heads

    k = resolve_k(options, data)
    check_k(k, model, options.target_modules)
    out = Path(options.out)
    kwargs = training_kwargs(options, data.task.defaults, "select")
    with values_are_user_errors():
        selection = select_heads(
            model,
            tokenizer,
            data.train,
            method=resolve_select_method(options, data),
            objective=data.task.objective,
            val_data=data.val,
            output_dir=str(out / "select"),
            **kwargs,
        )
    selection.save(out / "heads.json")
    selection.plot(out / "heads.png", k=k)
    return selection


def check_finite_adapter(model: LofitModel, options: RunOptions, lr: float | None) -> None:
    """Refuse to save an adapter whose values are not finite (the training diverged), naming the lr.

    Args:
        model: the trained model.
        options: the command's options (for the option's name).
        lr: the learning rate used.

    Raises:
        LofitRuntimeError: naming the learning rate and its option.
    """
    for parameter in model.adapter_parameters():
        values = parameter.detach()
        if not bool(values.isfinite().all()):
            option = options.flag("lr_train")
            raise LofitRuntimeError(
                f"offset training diverged: the trained adapter holds non-finite values (lr={lr}); "
                f"nothing was saved. Lower the learning rate ({option})"
            )


def run_training(
    options: RunOptions,
    data: PreparedData,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    heads: dict[int, list[int]],
) -> LofitModel:
    """Step 2: train offsets on `heads`; writes `out/adapter/` (only if every value is finite).

    Args:
        options: the command's options.
        data: the prepared task data.
        model: the base model; tokenizer: its tokenizer.
        heads: `{layer: [head, ...]}` to tune.

    Returns:
        The trained `LofitModel`.
    """
    from ..training.offsets import train_offsets

    out = Path(options.out)
    kwargs = training_kwargs(options, data.task.defaults, "train")
    with values_are_user_errors():
        lofit_model = train_offsets(
            model,
            tokenizer,
            data.train,
            heads=heads,
            objective=data.task.objective,
            val_data=data.val,
            output_dir=str(out / "train"),
            **kwargs,
        )
    check_finite_adapter(lofit_model, options, kwargs.get("lr"))
    lofit_model.save_pretrained(out / "adapter")
    return lofit_model


def evaluation_kwargs(
    data: PreparedData, batch_size: int, progress: bool, precision: str = "fp32"
) -> dict[str, Any]:
    """Keyword arguments of `lofit.evaluation.evaluate` for the task's protocol.

    Args:
        data: the prepared task data.
        batch_size: the evaluation batch size.
        progress: show progress bars.
        precision: `--precision` ("auto" is resolved here, so the base-evaluation cache keys on what ran).

    Returns:
        The keyword arguments (templates, extraction, max_new_tokens as the task needs).
    """
    kwargs: dict[str, Any] = {"batch_size": batch_size, "progress": progress, **data.task.eval_options}
    kwargs["precision"] = resolved_precision(precision)
    if data.task.extraction is not None:
        kwargs["extraction"] = data.task.extraction
    if data.task.eval_task == "exact_match" and data.task.max_new_tokens is not None:
        kwargs["max_new_tokens"] = data.task.max_new_tokens
    return kwargs


def select_step(options: RunOptions) -> HeadSelection:
    """`lofit select`: rank the heads and write `out/heads.json` and `out/heads.png` (needs no test data).

    Args:
        options: the command's options.

    Returns:
        The `HeadSelection`.
    """
    with guarded_output(options):
        check_output_dir(options.out)
        data = prepare_data(options, needs=("train",))
        model, tokenizer, _ = load(options)
        return run_selection(options, data, model, tokenizer)


def train_step(options: RunOptions, heads_file: Path) -> LofitModel:
    """`lofit train`: train offsets on the top-k heads of `heads_file`; writes `out/adapter/` (no test data).

    Args:
        options: the command's options.
        heads_file: the `--heads` file written by `lofit select`.

    Returns:
        The trained `LofitModel`.
    """
    with guarded_output(options, heads=heads_file):
        return _train(options, heads_file)


def _train(options: RunOptions, heads_file: Path) -> LofitModel:
    from ..adapters.heads import find_output_projections

    selection = load_selection(heads_file)
    check_output_dir(options.out)
    data = prepare_data(options, needs=("train",))
    k = resolve_k(options, data)
    try:
        heads = selection.top(k)
    except (TypeError, ValueError) as error:
        raise LofitValueError(f"--k {k}: {error} (the selection in {heads_file})") from None
    model, tokenizer, _ = load(options)
    geometry = find_output_projections(model, target_modules=options.target_modules)
    if (selection.num_layers, selection.num_heads) != (geometry.num_layers, geometry.num_heads):
        raise LofitValueError(
            f"{heads_file}: this head selection is for a model with {selection.num_layers} layers x "
            f"{selection.num_heads} heads, but {options.model} has {geometry.num_layers} x {geometry.num_heads}; "
            "select heads on this model first (lofit select)"
        )
    return run_training(options, data, model, tokenizer, heads)


def _check_metrics_file(
    out: Path | None,
    inputs: dict[str, Path | str | None],
    option: str = "--out",
    example: str = "metrics.json",
) -> None:
    if out is None:
        return
    check_output_apart(out, inputs)
    output_target(out)  # refuses a link, before the evaluation
    if out.is_dir():
        raise LofitValueError(
            f"{option} {out} is a directory; eval writes one file there: give a file name such as {out / example}"
        )
    if out.parent.exists() and not out.parent.is_dir():
        raise LofitValueError(
            f"{option} {out}: {out.parent} is a file, not a directory; choose another {option}"
        )


def samples_file(log_samples: Path | bool | None, out: Path | None) -> Path | None:
    """Where `lofit eval --log-samples [FILE]` writes: FILE, or beside `--out` (metrics.json -> metrics.samples.jsonl).

    Example:
        >>> samples_file(True, Path("runs/metrics.json")).as_posix(), samples_file(None, None)
        ('runs/metrics.samples.jsonl', None)
    """
    if log_samples is None or log_samples is False:
        return None
    if isinstance(log_samples, Path):
        return log_samples
    if out is None:
        raise LofitValueError(
            "--log-samples needs a file: give --log-samples FILE (e.g. samples.jsonl), or --out for the metrics "
            "and the samples go beside it"
        )
    return out.with_name(out.stem + ".samples.jsonl")


def eval_step(
    options: RunOptions,
    adapter: Path | None,
    split: str,
    out: Path | None,
    log_samples: Path | bool | None = None,
) -> dict[str, Any]:
    """`lofit eval`: score the model (with `adapter` if given) on the task's `split`; write `out` if given.

    Args:
        options: the command's options.
        adapter: the `--adapter` directory, or None for the base model.
        split: "test" or "val".
        out: the metrics JSON file to write, or None.
        log_samples: `--log-samples`: True (beside `out`), a JSONL file, or None (no per-record log; see
            `lofit.evaluation.samples`).

    Returns:
        The metrics, with `n` (records scored) and `standard_errors` (one per metric, see
        `lofit.evaluation.uncertainty`), as written to `out`.
    """
    from ..evaluation import evaluate
    from ..evaluation.uncertainty import per_record_scores, standard_error
    from ..io.atomic import atomic_write_json

    inputs = input_paths(options, adapter=adapter)
    _check_metrics_file(out, inputs)
    samples = samples_file(log_samples, out)
    _check_metrics_file(samples, inputs, "--log-samples", "samples.jsonl")
    if samples is not None and out is not None and samples.resolve() == out.resolve():
        raise LofitValueError(f"--log-samples {samples} is the --out file; give another file name")
    data = prepare_data(options, needs=("val",) if split == "val" else ("test",))
    model, tokenizer, _ = load(options)
    if adapter is not None:
        model = load_adapter(model, adapter)
    records = data.test if split == "test" else data.val_eval
    model.eval()
    kwargs = evaluation_kwargs(data, options.eval_batch_size, options.progress, options.precision)
    metrics, details = evaluate(model, tokenizer, data.task.eval_task, records, return_details=True, **kwargs)
    errors = {
        name: standard_error(scores) for name in metrics if (scores := per_record_scores(details, name))
    }
    document = {"task": data.task.name, "split": split, "adapter": str(adapter), **metrics}
    document |= {"n": len(records), "standard_errors": errors}
    with write_guard(inputs):
        if samples is not None:
            from ..evaluation.samples import write_samples

            write_samples(samples, data.task.eval_task, details)
            document["samples"] = str(samples)
        if out is not None:
            atomic_write_json(out, document)
    return document


def merge_step(
    model: str,
    adapter: Path,
    out: Path,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """`lofit merge`: fold `adapter` into `model` and write a plain transformers checkpoint to `out`.

    Args:
        model: the base model (id, local path or the bundled name).
        adapter: the adapter directory.
        out: the new checkpoint directory (never one of the inputs).
        dtype: dtype of the written weights ("fp32", "bf16", "fp16", or "auto"/None: the checkpoint's own).
        overwrite: `--overwrite`: replace another model found in `out` (else refused).
        progress: show a progress bar over the steps.

    Returns:
        The directory written.
    """
    from ..integrations.export import merge_adapter_checkpoint

    local_model = model if Path(model).expanduser().exists() else None
    check_output_apart(out, {"--model": local_model, "--adapter": adapter})
    if not is_hub_adapter(adapter):  # a Hub repo id is resolved (and its errors named) by from_pretrained
        check_input_dir(adapter, "--adapter", ADAPTER_FILES)
    try:
        return merge_adapter_checkpoint(
            model,
            str(adapter),
            str(out),
            dtype=dtype,
            overwrite=overwrite,
            overwrite_option="--overwrite",
            progress=progress,
        )
    except LofitError:
        raise
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        reason = error.strerror or str(error)
        raise LofitRuntimeError(
            f"cannot write the merged checkpoint to {out}: {reason}. Free disk space (the checkpoint needs "
            "about the base model's size) or choose another --out"
        ) from error
    except RecursionError:
        raise AdapterLoadError(f"{adapter}/lofit_config.json: the JSON is nested too deeply") from None
    except (ValueError, TypeError, KeyError) as error:
        raise AdapterLoadError(
            f"cannot merge the adapter {adapter} into {model}: {error}. If lofit_config.json or "
            "lofit_model.safetensors was edited or is corrupt, save the adapter again"
        ) from None
