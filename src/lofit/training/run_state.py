"""The state of a training run: `TrainingRun` (fixed at its start) and `LoopState` (what moves)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoints import LoopPosition
from .encoding import Example
from .fsdp import ShardedBase
from .history import TrainingHistory
from .logprobs import TokenScorer
from .losses import Objective
from .lower_layers import LowerLayerCache
from .settings import TrainingConfig

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from accelerate import Accelerator


@dataclass
class TrainingRun:
    """What a training run fixes at its start."""

    model: nn.Module  # the TrainableAdapter (`_setup` checks that it is a module)
    objective: Objective
    train_examples: Sequence[Example]
    val_examples: Sequence[Example]
    config: TrainingConfig
    description: str
    regularizer: Callable[[], torch.Tensor] | None
    accelerator: Accelerator
    device: torch.device
    params: list[nn.Parameter]
    optimizer: Any  # accelerate's AcceleratedOptimizer around AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scorer: TokenScorer
    history: TrainingHistory
    identity: dict[str, Any]
    fsdp: bool
    output_dir: Path | None

    @property
    def rank(self) -> int:
        """This process's index."""
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        """The number of processes."""
        return self.accelerator.num_processes


@dataclass
class LoopState:
    """What moves while the run goes: the position, counters and the last checkpoint written."""

    position: LoopPosition
    generator: torch.Generator
    started: float
    last_write: float
    last_checkpoint: Path | None = None
    bar: Any = None
    sharded: ShardedBase | None = None
    lower_cache: LowerLayerCache | None = None
    switched_layers: list[nn.Module] = field(default_factory=list)

    @property
    def step(self) -> int:
        """Optimizer steps done so far."""
        return self.position.step
