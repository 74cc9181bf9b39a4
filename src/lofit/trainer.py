"""Compatibility names: the training loop lives in `lofit.training` (this module only re-exports)."""

from __future__ import annotations

import torch  # noqa: F401  (kept: callers patch `lofit.trainer.torch.cuda`)

from .training.adapter_model import AdapterModel, AdapterView
from .training.batching import epoch_batches, split_micro_batches
from .training.checkpoints import LoopPosition, latest_checkpoint, load_checkpoint, save_checkpoint
from .training.config import BF16_CPU_FLAGS, CHECKPOINT_SUBDIR, PRECISIONS, TrainingConfig, fastest_precision
from .training.distributed import make_accelerator, place_model, seed_everything
from .training.history import TrainingHistory
from .training.loop import (
    CURVE_NAME,
    LOG_EVERY_S,
    LOG_NAME,
    check_sequence_lengths,
    linear_schedule,
    train_adapter,
)
from .training.resume import RESULT_OPTIONS, run_identity
from .training.step import NonFiniteLossError

__all__ = [
    "BF16_CPU_FLAGS",
    "CHECKPOINT_SUBDIR",
    "CURVE_NAME",
    "LOG_EVERY_S",
    "LOG_NAME",
    "PRECISIONS",
    "RESULT_OPTIONS",
    "AdapterModel",
    "AdapterView",
    "LoopPosition",
    "NonFiniteLossError",
    "TrainingConfig",
    "TrainingHistory",
    "check_sequence_lengths",
    "epoch_batches",
    "fastest_precision",
    "latest_checkpoint",
    "linear_schedule",
    "load_checkpoint",
    "make_accelerator",
    "place_model",
    "run_identity",
    "save_checkpoint",
    "seed_everything",
    "split_micro_batches",
    "train_adapter",
]
