"""The training loop of both LoFiT steps, in small parts (names load on first use).

| module | job |
|---|---|
| `settings` | `TrainingConfig`: the options, validated |
| `history` | `TrainingHistory`: what a run did (no torch; plotting reads it) |
| `tokens` | text -> token ids (BOS kept, no EOS appended), common prefixes; used by every layer above |
| `encoding` | records -> token sequences (`SequenceEncoder`, `Example`) |
| `batching` | epoch order, micro-batches, padded `TokenBatch`es |
| `logprobs` | `TokenScorer`: log-probs with the LM head applied at scored positions only |
| `losses` | the SFT and DPO objectives |
| `trainable` | the `TrainableAdapter` protocol the loop trains, `AdapterView` for other adapters |
| `loop` | `train_adapter`: setup, epochs, validation, checkpoints |
| `step` | one optimizer step: micro-batches, all-reduce, clipping |
| `attention_kernel` | sdpa's math kernel for short CPU training batches (its backward is faster there) |
| `run_state` | `TrainingRun` (fixed at the start) and `LoopState` (what moves) |
| `resume` | what ties a checkpoint to its run; where a run starts |
| `checkpoints` | the training-state files (`--checkpoint-every`, `--resume`) |
| `distributed` | accelerator, placement, gradient all-reduce and clipping |
| `fsdp` | FSDP2 sharding of the frozen base |
| `lower_layers` | `cache_lower_layers`: the frozen layers below the adapter run once |
| `activation_checkpointing` | recompute decoder layers in backward (memory knob; not `checkpoints`) |
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainingConfig": "settings",
    "fastest_precision": "settings",
    "TrainingHistory": "history",
    "EncodedSequence": "encoding",
    "Example": "encoding",
    "SequenceEncoder": "encoding",
    "TokenBatch": "batching",
    "TokenScorer": "logprobs",
    "Objective": "losses",
    "SFTObjective": "losses",
    "DPOObjective": "losses",
    "make_objective": "losses",
    "encode_train_val": "losses",
    "TrainableAdapter": "trainable",
    "AdapterView": "trainable",
    "train_adapter": "loop",
    "NonFiniteLossError": "step",
    "seed_everything": "distributed",
    "CheckpointError": "checkpoints",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lofit.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
