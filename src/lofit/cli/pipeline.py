"""`lofit run`: select heads -> train offsets -> evaluate base and adapted model -> write artefacts.

The steps live in `lofit.cli.steps` (shared with the subcommands); this module only runs them in order and
assembles metrics.json and report.md (its options are `lofit.cli.options.RunOptions`, torch-free).
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import LofitValueError
from ..io.output_paths import check_output_dir
from .inputs import PreparedData, load, prepare_data
from .options import RunOptions
from .steps import (
    evaluation_kwargs,
    guarded_output,
    resolve_k,
    resolve_select_method,
    resolved_precision,
    run_selection,
    run_training,
    training_kwargs,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..adapters.model import LofitModel
    from ..selection.ranking import HeadSelection

__all__ = ["environment", "run", "validation_losses"]


def environment() -> dict[str, str]:
    """Versions and machine of this run, for metrics.json and report.md.

    Returns:
        `{"lofit", "python", "torch", "transformers", "machine", "command"}` as strings.
    """
    import torch
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
    """The validation loss after each epoch, from a `TrainingHistory.to_dict()`.

    Args:
        history: the history dict, or None.

    Returns:
        `[[epoch, validation loss], ...]` (empty without validation data).

    Example:
        >>> validation_losses({"validation": [{"epoch": 0, "val_loss": 2.5}, {"epoch": 1}]})
        [[0, 2.5]]
    """
    records = (history or {}).get("validation", [])
    return [[record["epoch"], record["val_loss"]] for record in records if "val_loss" in record]


def _evaluate_both(
    options: RunOptions, data: PreparedData, model: LofitModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[dict[str, Any], dict[str, float]]:
    """Base (adapter disabled) and adapted metrics with their standard errors, and the timings.

    The base evaluation comes from the base-evaluation cache (`lofit.evaluation.base_cache`) when this
    base model was scored on these test records with this protocol before; `base_cache` in the result
    says whether it was.
    """
    from ..evaluation import evaluate
    from ..evaluation.base_cache import BaseEvalCache
    from ..evaluation.uncertainty import metric_uncertainty

    kwargs = evaluation_kwargs(data, options.eval_batch_size, options.progress, options.precision)
    model.eval()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with model.disable_adapter():
        cache = BaseEvalCache.open(model, list(data.test), data.task.eval_task, kwargs)
        base = cache.load()
        if base is None:
            base = evaluate(model, tokenizer, data.task.eval_task, data.test, return_details=True, **kwargs)
            cache.store(base)
    timings["eval_base_s"] = time.perf_counter() - start
    start = time.perf_counter()
    adapted = evaluate(model, tokenizer, data.task.eval_task, data.test, return_details=True, **kwargs)
    timings["eval_lofit_s"] = time.perf_counter() - start
    results = {
        "base": base[0],
        "lofit": adapted[0],
        "uncertainty": metric_uncertainty(base, adapted),
        "base_cache": cache.status,
    }
    if options.log_samples:
        from ..evaluation.samples import write_samples

        for name, (_, details) in (("base", base), ("lofit", adapted)):
            write_samples(Path(options.out) / f"samples-{name}.jsonl", data.task.eval_task, details)
    return results, timings


def _metrics(
    options: RunOptions,
    data: PreparedData,
    selection: HeadSelection,
    model: LofitModel,
    heads: dict[int, list[int]],
    k: float | int,
) -> dict[str, Any]:
    return {
        "task": data.task.name,
        "eval_task": data.task.eval_task,
        "model": options.model,
        "heads": [[layer, head] for layer, layer_heads in heads.items() for head in layer_heads],
        "num_heads_selected": sum(len(h) for h in heads.values()),
        "total_heads": model.geometry.total_heads,
        "trainable_params": sum(p.numel() for p in model.adapter_parameters()),
        "counts": {"train": len(data.train), "val": len(data.val or []), "test": len(data.test)},
        "settings": {
            "select": training_kwargs(options, data.task.defaults, "select")
            | {"method": resolve_select_method(options, data)},
            "train": training_kwargs(options, data.task.defaults, "train"),
            "k": k,
            "fold": options.fold if data.task.name == "truthfulqa" else None,
            "eval_precision": resolved_precision(options.precision),
        },
        "validation": {
            "select": validation_losses(selection.history),
            "train": validation_losses(model.training_history.to_dict()),
        },
        # the frozen layers below the adapted heads run once (`--cache-lower-layers`): where, or why not
        "lower_layer_cache": model.training_history.summary.get("lower_layer_cache")
        or model.training_history.settings.get("lower_layer_cache_off"),
    }


def offset_tokens(model: LofitModel, tokenizer: Any, top_k: int = 10) -> list[dict[str, Any]] | str:
    """The logit lens of the trained offsets (`lofit.evaluation.logit_lens`), as metrics.json entries.

    Returns a note instead where the lens cannot be read on this model (e.g. no final norm found).
    """
    from ..evaluation.logit_lens import offset_logit_lens

    try:
        return [dataclasses.asdict(entry) for entry in offset_logit_lens(model, tokenizer, top_k=top_k)]
    except LofitValueError as error:
        return f"logit lens not available: {error}"


def run(options: RunOptions) -> dict[str, Any]:
    """Run the whole LoFiT pipeline and write DIR/{metrics.json, heads.json, heads.png, adapter/, report.md}.

    Args:
        options: what to run (`lofit.cli.options.RunOptions`); `options.out` is DIR.

    Returns:
        The metrics written to metrics.json: at least `base`, `lofit`, `heads`, `trainable_params`, and
        `uncertainty` (n and the standard errors of each metric and of each change).
    """
    out = Path(options.out)
    with guarded_output(options):
        check_output_dir(out)
        return _run(options, out)


def _run(options: RunOptions, out: Path) -> dict[str, Any]:
    from ..io.atomic import atomic_write_json
    from .report import write_report

    data = prepare_data(options, needs=("train", "test"))
    model, tokenizer, load_seconds = load(options)
    timings: dict[str, float] = {"load_model_s": load_seconds}

    start = time.perf_counter()
    selection = run_selection(options, data, model, tokenizer)
    timings["select_heads_s"] = time.perf_counter() - start
    k = resolve_k(options, data)
    heads = selection.top(k)
    start = time.perf_counter()
    lofit_model = run_training(options, data, model, tokenizer, heads)
    timings["train_offsets_s"] = time.perf_counter() - start

    results, eval_timings = _evaluate_both(options, data, lofit_model, tokenizer)
    metrics = {**_metrics(options, data, selection, lofit_model, heads, k), **results}
    metrics["timings"] = timings | eval_timings
    metrics["logit_lens"] = offset_tokens(lofit_model, tokenizer)
    metrics["environment"] = environment()
    atomic_write_json(out / "metrics.json", metrics)
    write_report(out, metrics)
    return metrics
