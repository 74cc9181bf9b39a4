"""What ties a checkpoint to its run (`run_identity`), and where a run starts (`start_position`)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LofitValueError
from .checkpoints import LoopPosition, latest_checkpoint, load_checkpoint
from .encoding import Example
from .history import TrainingHistory
from .losses import Objective
from .settings import TrainingConfig

# Options that decide the trained values: a checkpoint resumes only a run that agrees on all of them.
# grad_accum and the number of processes are left out on purpose (they do not change the result).
RESULT_OPTIONS = (
    "epochs", "batch_size", "lr", "l1", "beta", "weight_decay", "max_length", "seed",
    "warmup_ratio", "max_grad_norm", "precision", "init_std", "group_by_length",
)  # fmt: skip

logger = logging.getLogger(__name__)


def run_identity(
    config: TrainingConfig,
    objective: Objective,
    description: str,
    model: nn.Module,
    examples: Sequence[Example],
    params: Sequence[nn.Parameter],
) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed by this run: options, data, heads, shapes.

    `model.selected_heads()` is read where the model has it (LoFiT); other adapters have no heads.
    """
    selected_heads = getattr(model, "selected_heads", None)
    heads = selected_heads() if callable(selected_heads) else {}
    digest = hashlib.sha256()
    for example in examples:
        for sequence in example.sequences:
            digest.update(json.dumps([sequence.response_start, *sequence.input_ids]).encode())
    return {
        "description": description,
        "objective": objective.name,
        **{name: getattr(config, name) for name in RESULT_OPTIONS},
        "num_train": len(examples),
        "train_data_sha256": digest.hexdigest(),
        "heads": {str(layer): list(layer_heads) for layer, layer_heads in heads.items()},
        "parameter_shapes": [list(p.shape) for p in params],
    }


def start_position(
    config: TrainingConfig,
    identity: dict[str, Any],
    params: Sequence[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    history: TrainingHistory,
    description: str,
) -> tuple[LoopPosition | None, Path | None]:
    """Restore the latest checkpoint when `config.resume` asks for it.

    Returns:
        (the position to continue from, the checkpoint it came from), or (None, None) for a fresh start.
        A checkpoint directory holding an earlier run without `resume` raises `LofitValueError`.
    """
    root = config.checkpoints_path
    found = latest_checkpoint(root) if root is not None else None
    if config.resume and found is not None:
        checkpoint = load_checkpoint(found)
        position = checkpoint.restore(identity, params, optimizer, scheduler)
        restored = TrainingHistory.from_dict(checkpoint.history)
        history.steps, history.validation = restored.steps, restored.validation
        history.settings["resumed_from_step"] = position.step
        logger.info("%s: resuming from %s (step %d)", description, found, position.step)
        return position, found
    if config.resume:
        logger.warning("%s: resume asked for, but %s holds no checkpoint; starting afresh", description, root)
    elif found is not None and config.checkpoint_every:
        raise LofitValueError(
            f"{root} holds checkpoints of an earlier run (latest: {found.name}); pass resume=True "
            "(--resume) to continue it, or delete that directory to start afresh"
        )
    return None, None
