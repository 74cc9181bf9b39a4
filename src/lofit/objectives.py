"""Compatibility names: records, encoding, batching, scoring and losses live in `lofit.training`."""

from __future__ import annotations

from .training.batching import TokenBatch, collate, pad_token_id
from .training.encoding import EncodedSequence, Example, SequenceEncoder, tokenize_text
from .training.losses import (
    DPOObjective,
    LossOutput,
    Objective,
    SFTObjective,
    dpo_losses,
    encode_train_val,
    loss_sums,
    make_objective,
    mean_loss,
    sums_to_means,
)
from .training.records import OBJECTIVE_FIELDS, RecordError, as_records, objective_fields, train_val_records
from .training.scoring import TokenScorer, sequence_logps

__all__ = [
    "OBJECTIVE_FIELDS",
    "DPOObjective",
    "EncodedSequence",
    "Example",
    "LossOutput",
    "Objective",
    "RecordError",
    "SFTObjective",
    "SequenceEncoder",
    "TokenBatch",
    "TokenScorer",
    "as_records",
    "collate",
    "dpo_losses",
    "encode_train_val",
    "loss_sums",
    "make_objective",
    "mean_loss",
    "objective_fields",
    "pad_token_id",
    "sequence_logps",
    "sums_to_means",
    "tokenize_text",
    "train_val_records",
]
