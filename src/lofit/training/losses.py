"""The objectives: SFT (token cross-entropy) and sigmoid DPO against the base model, as summed losses.

An objective encodes records into `Example`s and computes a micro-batch's *summed* loss and its unit
count (scored tokens for SFT, pairs for DPO); the loop divides by the global batch's units, so the
update does not depend on how a batch is split over micro-batches or processes.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LofitRuntimeError, LofitValueError
from ..tasks.records import Record, objective_fields
from .batching import TokenBatch, collate, pad_token_id
from .encoding import CHARS_PER_TOKEN, EncodedSequence, Example, SequenceEncoder
from .logprobs import TokenScorer, sequence_logps

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Device = torch.device | str


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair sigmoid DPO loss: -log σ(β[(π_c − r_c) − (π_r − r_r)]) on summed log-probs.

    Example:
        >>> zero = torch.zeros(1)
        >>> round(float(dpo_losses(zero, zero, zero, zero, beta=0.5)), 4)  # log 2
        0.6931
    """
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin)


def truncation_description(response_cut: int) -> str:
    """Which part of the truncated sequences was cut, for the truncation warning."""
    if not response_cut:
        return "prompt cut from the left"
    return (
        f"prompt cut from the left; in {response_cut} of them the completion/response alone was longer, so "
        "it was cut on the right too: raise --max-length"
    )


@dataclass
class LossOutput:
    """Sums over a micro-batch; the trainer divides by the global batch's `units`."""

    loss_sum: torch.Tensor
    units: int
    metric_sums: dict[str, float] = field(default_factory=dict)


def adapter_disabled(model: nn.Module) -> AbstractContextManager[Any]:
    """The model's `disable_adapter()` context; a model without one is a bare base (nothing to switch)."""
    switch = getattr(model, "disable_adapter", None)
    return switch() if callable(switch) else contextlib.nullcontext()


class Objective:
    """Encodes records and computes a batch's summed loss; `units` is what the batch mean divides by.

    Args:
        tokenizer: the model's tokenizer.
        max_length: longest sequence kept (prompts cut from the left); None keeps all.
    """

    name = ""
    metric_names: tuple[str, ...] = ()  # extra per-unit metrics that `loss` sums

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int | None = None,
        max_positions: int | None = None,
    ) -> None:
        self.encoder = SequenceEncoder(tokenizer, max_length, max_positions)
        self.pad_token_id = pad_token_id(tokenizer)

    def encode(self, records: Sequence[Mapping[str, str]]) -> list[Example]:
        """Tokenise every record (warning once if any sequence had to be cut to max_length)."""
        encoder = self.encoder
        before, cut_before = encoder.num_truncated, encoder.num_response_cut
        examples = [Example(i, self.encode_record(record)) for i, record in enumerate(records)]
        truncated = encoder.num_truncated - before
        response_cut = encoder.num_response_cut - cut_before
        sequences = sum(len(e.sequences) for e in examples)
        if sequences and response_cut == sequences:
            raise LofitValueError(
                f"every one of the {sequences} sequences is longer than max_length={encoder.max_length} "
                f"tokens even without its prompt, so each completion would be cut and none trained on whole "
                f"(the longest sequence has {encoder.longest} tokens); raise max_length (--max-length) to at "
                "least that, or shorten the completions"
            )
        if encoder.num_text_cut:
            warnings.warn(
                f"{encoder.num_text_cut} training text(s) longer than {CHARS_PER_TOKEN} characters per position "
                f"of the model ({encoder.max_positions}) were cut before tokenising, by up to "
                f"{encoder.most_chars_cut} characters (prompts from the left, completions from the right)",
                stacklevel=2,
            )
            encoder.num_text_cut = 0
        if truncated:
            warnings.warn(
                f"{truncated} of {sequences} sequences exceed max_length={encoder.max_length} tokens and were "
                f"truncated by up to {encoder.most_cut} tokens ({truncation_description(response_cut)})",
                stacklevel=2,
            )
        return examples

    def encode_record(self, record: Mapping[str, str]) -> tuple[EncodedSequence, ...]:
        """The record's sequences (one for SFT, chosen and rejected for DPO)."""
        raise NotImplementedError

    def units(self, example: Example) -> int:
        """What the example adds to the count the batch mean divides by."""
        raise NotImplementedError

    def prepare(
        self, scorer: TokenScorer, examples: Sequence[Example], batch_size: int, device: Device
    ) -> None:
        """Work needed once before training (DPO: cache the reference log-probs)."""

    def loss(self, scorer: TokenScorer, examples: Sequence[Example], device: Device) -> LossOutput:
        """The summed loss of `examples` (with gradients) and its unit count."""
        raise NotImplementedError

    def batch(self, examples: Sequence[Example]) -> TokenBatch:
        """All sequences of `examples` as one right-padded batch."""
        return collate([s for example in examples for s in example.sequences], self.pad_token_id)


class SFTObjective(Objective):
    """Token-level cross-entropy on completion + EOS, averaged over all scored tokens of the batch."""

    name = "sft"

    def encode_record(self, record: Mapping[str, str]) -> tuple[EncodedSequence, ...]:
        """One sequence: prompt + completion + EOS."""
        return (self.encoder.encode(record["prompt"], record["completion"]),)

    def units(self, example: Example) -> int:
        """Its scored tokens."""
        return example.sequences[0].num_targets

    def loss(self, scorer: TokenScorer, examples: Sequence[Example], device: Device) -> LossOutput:
        """Summed negative log-likelihood of the scored tokens."""
        batch = self.batch(examples).to(device)
        token_logps = scorer(batch)
        return LossOutput(-token_logps.sum(), int(token_logps.numel()))


class DPOObjective(Objective):
    """Sigmoid DPO against the frozen base model (the model with its adapter disabled), averaged over pairs.

    Args:
        tokenizer: the model's tokenizer.
        max_length: longest sequence kept; None keeps all.
        beta: the DPO temperature β (> 0).
    """

    name = "dpo"
    metric_names = ("reward_margin", "reward_accuracy")

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int | None = None,
        beta: float = 0.5,
        max_positions: int | None = None,
    ) -> None:
        super().__init__(tokenizer, max_length, max_positions)
        if not beta > 0:
            raise LofitValueError(f"beta must be > 0, got {beta}")
        self.beta = float(beta)

    def encode_record(self, record: Mapping[str, str]) -> tuple[EncodedSequence, ...]:
        """Two sequences: prompt + chosen, prompt + rejected."""
        prompt = record["prompt"]
        return (
            self.encoder.encode(prompt, record["chosen"]),
            self.encoder.encode(prompt, record["rejected"]),
        )

    def units(self, example: Example) -> int:
        """One pair."""
        return 1

    def prepare(
        self, scorer: TokenScorer, examples: Sequence[Example], batch_size: int, device: Device
    ) -> None:
        """Cache each pair's reference log-probs, computed with the adapter disabled (always: also on resume)."""
        missing = [e for e in examples if e.reference_logps is None]
        if not missing:
            return
        # Batched by length (each pair's value is its own): far less padding than the training order.
        missing.sort(key=lambda e: max(len(s.input_ids) for s in e.sequences))
        with adapter_disabled(scorer.model), torch.no_grad():
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                batch = self.batch(chunk).to(device)
                logps = sequence_logps(scorer(batch), batch).view(len(chunk), 2).cpu().tolist()
                for example, pair in zip(chunk, logps, strict=True):
                    example.reference_logps = (pair[0], pair[1])

    def loss(self, scorer: TokenScorer, examples: Sequence[Example], device: Device) -> LossOutput:
        """Summed DPO loss of the pairs, with the summed reward margin and reward accuracy."""
        if any(e.reference_logps is None for e in examples):
            raise LofitRuntimeError(
                "DPO reference log-probs are missing; call prepare() before computing the loss"
            )
        batch = self.batch(examples).to(device)
        policy = sequence_logps(scorer(batch), batch).view(len(examples), 2)
        reference = torch.tensor(
            [e.reference_logps for e in examples], dtype=policy.dtype, device=policy.device
        )
        losses = dpo_losses(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], self.beta)
        with torch.no_grad():
            rewards = self.beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
            metrics = {"reward_margin": float(rewards.sum()), "reward_accuracy": float((rewards > 0).sum())}
        return LossOutput(losses.sum(), len(examples), metrics)


def make_objective(
    objective: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    beta: float = 0.5,
    max_positions: int | None = None,
) -> Objective:
    """The objective named "sft" (`SFTObjective`) or "dpo" (`DPOObjective` with temperature `beta`).

    `max_positions` (the model's, `training.encoding.max_positions`) bounds texts before tokenising when
    there is no `max_length`.
    """
    objective_fields(objective)
    if objective == "dpo":
        return DPOObjective(tokenizer, max_length, beta, max_positions)
    return SFTObjective(tokenizer, max_length, max_positions)


def encode_train_val(
    objective: str,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    val_records: Sequence[Record] | None,
    max_length: int | None = None,
    beta: float = 0.5,
    max_positions: int | None = None,
) -> tuple[Objective, list[Example], list[Example] | None]:
    """The objective named `objective` and the encoded training (and validation) examples."""
    task = make_objective(objective, tokenizer, max_length, beta, max_positions)
    return task, task.encode(records), task.encode(val_records) if val_records else None


def loss_sums(
    objective: Objective, scorer: TokenScorer, examples: Sequence[Example], batch_size: int, device: Device
) -> dict[str, float]:
    """{"loss": summed loss, "units": its count, metric sums...} over `examples`, without gradients.

    Every key is present even for no examples, so processes can all-reduce the same vector.
    """
    objective.prepare(scorer, examples, batch_size, device)
    sums: dict[str, float] = {"loss": 0.0, "units": 0.0, **dict.fromkeys(objective.metric_names, 0.0)}
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            out = objective.loss(scorer, examples[start : start + batch_size], device)
            sums["loss"] += float(out.loss_sum)
            sums["units"] += out.units
            for key, value in out.metric_sums.items():
                sums[key] = sums.get(key, 0.0) + value
    return sums


def mean_loss(
    objective: Objective, scorer: TokenScorer, examples: Sequence[Example], batch_size: int, device: Device
) -> dict[str, float]:
    """The objective's mean loss (and metric means) over `examples`, without gradients."""
    return sums_to_means(loss_sums(objective, scorer, examples, batch_size, device))


def sums_to_means(sums: dict[str, float]) -> dict[str, float]:
    """Divide every sum by `sums["units"]` (at least 1); the units themselves are dropped.

    Example:
        >>> sums_to_means({"loss": 6.0, "units": 3.0})
        {'loss': 2.0}
    """
    units = max(sums["units"], 1.0)
    return {key: value / units for key, value in sums.items() if key != "units"}
