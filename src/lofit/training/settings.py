"""`TrainingConfig`: the options of the training loop shared by `select_heads` and `train_offsets`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LofitValueError

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# CPUs whose bf16 matmuls beat fp32 (2.6x measured, see benchmarks/results/speed.md)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CHECKPOINT_SUBDIR = "checkpoints"


class UnknownOptionError(LofitValueError, TypeError):
    """A training keyword argument that `TrainingConfig` does not know (a TypeError, as Python's own)."""


@dataclass
class TrainingConfig:
    """Training options understood by `select_heads` and `train_offsets` (defaults: docs/method.md §5).

    Every field is validated when the config is built; a bad value raises `LofitValueError` naming the
    field and what it accepts.

    Example:
        >>> from lofit.training import TrainingConfig
        >>> config = TrainingConfig(epochs=2, batch_size=4)
        >>> config.validation_batch_size
        8
    """

    epochs: int = field(default=5, metadata={"help": "passes over the training records"})
    batch_size: int = field(default=8, metadata={"help": "records per optimizer step (all processes)"})
    lr: float = field(default=1e-2, metadata={"help": "peak AdamW learning rate"})
    l1: float = field(default=0.0, metadata={"help": "λ of the L1 penalty on the scales (selection)"})
    beta: float = field(default=0.5, metadata={"help": "DPO temperature β"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (paper: 0.01)"})
    max_length: int | None = field(default=None, metadata={"help": "truncate sequences to this many tokens"})
    seed: int = field(default=42, metadata={"help": "seed of the adapter init and the data order"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of steps with linear warm-up"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    precision: str = field(
        default="fp32",
        metadata={"help": "fp32, bf16 or fp16 (mixed, via accelerate); auto = bf16 where it is fast"},
    )
    init_std: float = field(default=1e-3, metadata={"help": "std of the N(0, σ) adapter init"})
    group_by_length: bool = field(default=False, metadata={"help": "batch records of similar length"})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute decoder-layer activations in backward: less memory, slower steps"},
    )
    cache_lower_layers: bool | str = field(
        default=False,
        metadata={
            "help": "keep the hidden states entering the lowest adapted layer; later passes start there "
            "(True; 'auto': only when they fit in memory; False: off)"
        },
    )
    eval_batch_size: int | None = field(default=None, metadata={"help": "validation batch (default 2x)"})
    output_dir: str | None = field(default=None, metadata={"help": "write train_log.jsonl, loss_curve.png"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})
    checkpoint_every: int = field(
        default=0, metadata={"help": "save a checkpoint every N steps and at each epoch end (0 = off)"}
    )
    checkpoint_dir: str | None = field(
        default=None, metadata={"help": "where checkpoints go (default: output_dir/checkpoints)"}
    )
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint, if any"})

    def __post_init__(self) -> None:
        _check_counts(self)
        _check_rates(self)
        if self.precision == "auto":
            self.precision = fastest_precision()
        if self.precision not in PRECISIONS:
            raise LofitValueError(
                f"precision must be 'auto' or one of {sorted(PRECISIONS)}, got {self.precision!r}"
            )
        if self.cache_lower_layers not in (True, False, "auto"):
            raise LofitValueError(
                f"cache_lower_layers must be True, False or 'auto', got {self.cache_lower_layers!r}"
            )
        if (self.checkpoint_every or self.resume) and self.checkpoints_path is None:
            raise LofitValueError(
                "checkpoint_every and resume need output_dir or checkpoint_dir to keep checkpoints in"
            )

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any], *, owner: str, **defaults: Any) -> TrainingConfig:
        """Build from user keyword arguments over `defaults`.

        Args:
            kwargs: the user's training options.
            owner: the public function that received them (named in the error).
            **defaults: the owner's own defaults, overridden by `kwargs`.

        Returns:
            The validated config. Unknown names raise `UnknownOptionError` (a TypeError) listing the known.

        Example:
            >>> TrainingConfig.from_kwargs({"epochs": 1}, owner="train_offsets", lr=5e-3).lr
            0.005
        """
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise UnknownOptionError(
                f"{owner}() got unknown training option(s) {unknown}; known options: {known}"
            )
        return cls(**{**defaults, **kwargs})

    @property
    def validation_batch_size(self) -> int:
        """Records per validation batch: `eval_batch_size`, or twice the training batch."""
        return self.eval_batch_size or 2 * self.batch_size

    @property
    def checkpoints_path(self) -> Path | None:
        """Where checkpoints are kept: `checkpoint_dir`, else `output_dir/checkpoints`, else None."""
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        return Path(self.output_dir) / CHECKPOINT_SUBDIR if self.output_dir else None


def _check_counts(config: TrainingConfig) -> None:
    for name in ("epochs", "batch_size", "grad_accum", "seed", "checkpoint_every"):
        value = getattr(config, name)
        least = 0 if name in ("seed", "checkpoint_every") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise LofitValueError(f"{name} must be an integer >= {least}, got {value!r}")
    for name in ("max_length", "eval_batch_size"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise LofitValueError(f"{name} must be a positive integer or None, got {value!r}")


def _check_rates(config: TrainingConfig) -> None:
    for name in ("lr", "l1", "weight_decay", "max_grad_norm", "init_std"):
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise LofitValueError(f"{name} must be a finite number >= 0, got {value!r}")
        setattr(config, name, float(value))
    if not config.lr > 0:
        raise LofitValueError(f"lr must be > 0, got {config.lr}")
    beta = config.beta
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise LofitValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not (isinstance(config.warmup_ratio, (int, float)) and 0 <= config.warmup_ratio < 1):
        raise LofitValueError(f"warmup_ratio must be in [0, 1), got {config.warmup_ratio!r}")


def fastest_precision() -> str:
    """The precision that trains fastest here: "bf16" where bf16 autocast is fast, else "fp32".

    bf16 is fast on CUDA devices that support it and on CPUs with bf16 matmul instructions.

    Returns:
        "bf16" or "fp32".

    Example:
        >>> fastest_precision() in ("bf16", "fp32")
        True
    """
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return "fp32"
    return "bf16" if any(flag in flags for flag in BF16_CPU_FLAGS) else "fp32"
