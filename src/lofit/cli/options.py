"""`RunOptions`: what `lofit run`, `select`, `train` and `eval` were asked to do, validated; imports no torch.

The command line parses into these options before anything heavy is imported, so `lofit --help` and
`lofit <command> --help` stay fast. A value that cannot work is refused here with a message naming the
option (`--lr-train`, `--max-train`, ...), before any file or model is loaded. Every subcommand spells the
same setting the same way (`--select-method`, `--lr-select`, `--lr-train`, `--eval-batch-size`, ...).

Example:
    >>> from lofit.cli.options import RunOptions, parse_k
    >>> parse_k("27"), parse_k("0.1")
    (27, 0.1)
    >>> RunOptions(task="sft", out="runs/x", max_train=-1)
    Traceback (most recent call last):
    ...
    lofit.errors.LofitValueError: --max-train -1: give a number of records >= 0 (the first N records are used)
"""

from __future__ import annotations

import argparse
import difflib
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import LofitValueError
from ..io.quantization import QUANTIZATIONS
from ..selection.selectors import METHODS
from ..training.settings import PRECISIONS as TRAINING_PRECISIONS

PRECISIONS = ("auto", *TRAINING_PRECISIONS)
SELECT_METHODS = METHODS  # the selector table's names (`lofit.selection.selectors`)


def parse_k(value: str | float | int) -> float | int:
    """Parse `--k`: an int number of heads (`27`) or a fraction of all heads in (0, 1] (`0.1`).

    Args:
        value: the option's text or a number.

    Returns:
        An `int` for whole numbers >= 1, else the `float` fraction.

    Raises:
        argparse.ArgumentTypeError: not a positive finite number (argparse turns it into exit code 2).
    """
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(
            f"--k {value}: give a number of heads (1, 2, ...) or a fraction of all heads in (0, 1]"
        )
    if number.is_integer() and number >= 1:
        return int(number)
    return number


def suggest_option(given: str, valid: list[str]) -> str | None:
    """The valid option closest to the unknown option `given` (None if none is close).

    An option whose dash-separated words begin or end with `given`'s words wins (`--method` ->
    `--select-method`, `--lr` -> `--lr-select`, `--batch-size` -> `--eval-batch-size`); else the closest
    spelling (difflib), so a typo finds its option.

    Args:
        given: the unknown option as typed (`--lr`, `--max-tets=5`).
        valid: the command's options.

    Returns:
        The suggestion (several joined by " or " when equally good), or None.

    Example:
        >>> suggest_option("--method", ["--select-method", "--k", "--l1"])
        '--select-method'
        >>> suggest_option("--lr", ["--l1", "--lr-select", "--lr-train"])
        '--lr-select or --lr-train'
        >>> suggest_option("--max-tets=5", ["--max-test", "--max-train"])
        '--max-test'
        >>> suggest_option("--colour", ["--k"]) is None
        True
    """
    name = given.split("=", 1)[0]
    words = name.lstrip("-").split("-")
    longs = [option for option in valid if option.startswith("--")]
    by_words = [
        option
        for option in longs
        if len(option.lstrip("-").split("-")) > len(words)
        and (
            option.lstrip("-").split("-")[: len(words)] == words
            or option.lstrip("-").split("-")[-len(words) :] == words
        )
    ]
    if by_words:
        return " or ".join(sorted(by_words))
    close = difflib.get_close_matches(name, longs, n=1, cutoff=0.6)
    return close[0] if close else None


# `--cache-lower-layers`: on = always (refused if too large), auto = when it fits (the default), off.
CACHE_LOWER_LAYERS = ("auto", "on", "off")


@dataclass
class RunOptions:
    """Everything the pipeline's steps need; `None` means the task's default (see `lofit.tasks.defaults`).

    Args:
        task: the task name (see `lofit.tasks.TASK_NAMES`).
        out: the output directory.
        command: the command the options came from ("run", "select", "train", "eval"), for option names
            in messages.
        Other fields mirror the command-line options of the same name.

    Raises:
        LofitValueError: a value that cannot work, naming the option to change.
    """

    task: str
    out: Path
    model: str = "smollm2-135m"
    train_file: str | None = None
    val_file: str | None = None
    test_file: str | None = None
    data_dir: str | None = None
    fold: int = 0
    k: float | None = None
    select_method: str | None = None
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
    cache_lower_layers: str = "auto"
    target_modules: list[str] | None = None
    device_map: str | None = None
    quantization: str | None = None
    log_samples: bool = False
    command: str = "run"

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self._check_counts()
        self._check_rates()
        self._check_choices()

    def flag(self, name: str) -> str:
        """The command-line option that sets field `name` (e.g. `--lr-select` for `lr_select`).

        Args:
            name: a field name of `RunOptions`.

        Returns:
            The option's spelling, e.g. `"--max-train"`.
        """
        return {"train_file": "--train", "val_file": "--val", "test_file": "--test"}.get(
            name, "--" + name.replace("_", "-")
        )

    def _refuse(self, name: str, fix: str) -> LofitValueError:
        return LofitValueError(f"{self.flag(name)} {getattr(self, name)}: {fix}")

    def _check_counts(self) -> None:
        for name in ("max_train", "max_val", "max_test"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise self._refuse(name, "give a number of records >= 0 (the first N records are used)")
        for name, least in (
            ("epochs", 1),
            ("batch_size", 1),
            ("eval_batch_size", 1),
            ("checkpoint_every", 0),
        ):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < least):
                raise self._refuse(name, f"{name} must be an integer >= {least}")
        if self.max_length is not None and (not _is_int(self.max_length) or self.max_length < 2):
            raise self._refuse(
                "max_length", "max_length must be at least 2 tokens (a prompt and a completion)"
            )
        if self.fold not in (0, 1):
            raise self._refuse("fold", "TruthfulQA has folds 0 and 1")

    def _check_rates(self) -> None:
        for name, positive in (("lr_select", True), ("lr_train", True), ("l1", False), ("beta", True)):
            value = getattr(self, name)
            if value is None:
                continue
            label = "lr" if name.startswith("lr") else name
            bound = "> 0" if positive else ">= 0"
            if not (isinstance(value, (int, float)) and math.isfinite(value)) or (
                value <= 0 if positive else value < 0
            ):
                raise self._refuse(name, f"{label} must be a finite number {bound}")
            if name.startswith("lr") and value > 10:
                raise self._refuse(
                    name, f"lr={value:g} is far too large (training diverges); use e.g. 1e-3 to 1e-1"
                )
        if self.k is not None:
            parse_k(self.k)

    def _check_choices(self) -> None:
        for name, allowed in (
            ("precision", PRECISIONS),
            ("select_method", (None, *SELECT_METHODS)),
            ("quantization", (None, *QUANTIZATIONS)),
            ("cache_lower_layers", CACHE_LOWER_LAYERS),
        ):
            if getattr(self, name) not in allowed:
                raise self._refuse(name, f"choose one of {', '.join(str(a) for a in allowed if a)}")
        if self.target_modules is not None and not all(
            isinstance(suffix, str) and suffix.strip() for suffix in self.target_modules
        ):
            raise self._refuse("target_modules", "give module-name suffixes such as self_attn.o_proj")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
