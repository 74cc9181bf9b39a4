"""What a command reads, loaded with errors that name the option or file to fix: the task's records
(cut to `--max-*`), the base model, a `--heads` file and an `--adapter` directory.

Bad input that surfaces in another module's code as a builtin error (a `ValueError` while reading a heads
file or an adapter) is re-raised here as a `LofitError` with the same message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AdapterLoadError, LofitError, LofitValueError
from ..io.output_paths import check_input_dir, check_input_file, is_hub_adapter
from ..tasks.defaults import defaults_for
from .options import RunOptions

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from ..adapters.model import LofitModel
    from ..selection.ranking import HeadSelection
    from ..tasks import Task

__all__ = [
    "ADAPTER_FILES",
    "PreparedData",
    "input_paths",
    "load",
    "load_adapter",
    "load_selection",
    "prepare_data",
]

ADAPTER_FILES = "lofit_config.json and lofit_model.safetensors"


@dataclass
class PreparedData:
    """A task's records for one command, cut to `--max-train/--max-val/--max-test`.

    Args:
        task: the loaded `lofit.tasks.Task`.
        train: training records; val: validation records in the training format (None: no validation);
        val_eval: validation records in the evaluation format; test: test records.
    """

    task: Task
    train: list[dict[str, Any]]
    val: list[dict[str, Any]] | None
    val_eval: list[dict[str, Any]]
    test: list[dict[str, Any]]


def _first(records: Any, limit: int | None) -> list[dict[str, Any]]:
    records = list(records or [])
    return records if limit is None else records[:limit]


def input_paths(options: RunOptions, **extra: Path | str | None) -> dict[str, Path | str | None]:
    """The paths a command reads, by option name (the model only when it is a local path).

    Args:
        options: the command's options.
        extra: more inputs, e.g. `heads=...`, `adapter=...` (keys become `--heads`, `--adapter`).

    Returns:
        `{"--train": ..., "--model": ..., ...}`; entries may be None.
    """
    model = options.model if Path(options.model).expanduser().exists() else None
    paths: dict[str, Path | str | None] = {
        "--model": model,
        "--train": options.train_file,
        "--val": options.val_file,
        "--test": options.test_file,
        "--data-dir": options.data_dir,
    }
    paths.update({f"--{name.replace('_', '-')}": value for name, value in extra.items()})
    return paths


def prepare_data(options: RunOptions, needs: tuple[str, ...] = ("train", "test")) -> PreparedData:
    """Load the task and cut its splits to the `--max-*` limits.

    Args:
        options: the command's options.
        needs: the splits this command uses; a generic task requires their files, and an empty needed
            split is refused here, before any model is loaded.

    Returns:
        The records of every split.
    """
    from ..tasks import load_task

    task = load_task(
        options.task,
        data_dir=options.data_dir,
        fold=options.fold,
        seed=options.seed,
        train_file=options.train_file,
        val_file=options.val_file,
        test_file=options.test_file,
        needs=needs,
    )
    # One home for defaults: a task without its own value takes the table's (lofit.tasks.defaults).
    task.defaults = defaults_for(task.name, task.objective).as_dict() | task.defaults
    data = PreparedData(
        task=task,
        train=_first(task.train, options.max_train),
        val=_first(task.val, options.max_val) or None,
        val_eval=_first(getattr(task, "val_eval", None), options.max_val),
        test=_first(task.test, options.max_test),
    )
    for split in needs:
        records = {"train": data.train, "test": data.test, "val": data.val_eval}[split]
        if not records:
            limit = getattr(options, f"max_{split}")
            cause = f" after --max-{split} {limit}" if limit is not None else ""
            raise LofitValueError(
                f"{split}_data is empty{cause}: the {split} split of task {task.name!r} has no records; "
                f"give at least one (raise --max-{split} or pass a --{split} file with records)"
            )
    return data


def load(options: RunOptions) -> tuple[nn.Module, PreTrainedTokenizerBase, float]:
    """Load the base model and tokenizer of `options.model` (with its device map / quantization).

    Args:
        options: the command's options.

    Returns:
        `(model, tokenizer, seconds it took)`.
    """
    from ..io.loading import load_model

    start = time.perf_counter()
    model, tokenizer = load_model(
        options.model, device_map=options.device_map, quantization=options.quantization
    )
    return model, tokenizer, time.perf_counter() - start


def load_selection(path: Path) -> HeadSelection:
    """Read a heads.json given as `--heads`, every problem naming the file.

    Args:
        path: the file.

    Returns:
        The `HeadSelection`.
    """
    from ..selection.ranking import HeadSelection

    check_input_file(path, "--heads")
    try:
        return HeadSelection.load(path)
    except LofitError:
        raise
    except RecursionError:
        raise LofitValueError(
            f"{path}: the JSON is nested too deeply to be a head-selection file; write one with `lofit select`"
        ) from None
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise LofitValueError(f"{path}: not a valid head-selection file ({error})") from None


def load_adapter(model: nn.Module, adapter: Path) -> LofitModel:
    """`LofitModel.from_pretrained(model, adapter)`, every problem with the adapter's files naming them.

    Args:
        model: the base model.
        adapter: the `--adapter` directory.

    Returns:
        The model with the adapter loaded.

    Raises:
        AdapterLoadError / LofitValueError: naming the directory or file and what is wrong.
    """
    from ..adapters.model import LofitModel

    if not is_hub_adapter(adapter):  # a Hub repo id is resolved (and its errors named) by from_pretrained
        check_input_dir(adapter, "--adapter", ADAPTER_FILES)
    try:
        return LofitModel.from_pretrained(model, adapter)
    except LofitError:
        raise
    except RecursionError:
        raise AdapterLoadError(f"{adapter}/lofit_config.json: the JSON is nested too deeply") from None
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise AdapterLoadError(
            f"{adapter}: lofit_config.json or lofit_model.safetensors holds an invalid value ({error}); "
            "the adapter is corrupt or was edited: save it again with save_pretrained / lofit train"
        ) from None
