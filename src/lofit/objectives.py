"""Training objectives: records -> token sequences -> SFT or DPO loss.

Every sequence is prompt + response + EOS; only the response tokens and the EOS are scored. The
prompt/response boundary is found by tokenising the prompt and prompt + response separately and taking
their longest common prefix, so it is right for tokenizers that add a BOS token and for BPE merges across
the boundary (a token that mixes prompt and response text counts as response).

The language-model head is applied only at the positions whose next token is scored (`TokenScorer`):
the decoder body runs once, its hidden states are gathered at those positions, and only they go through
the output embedding. For a 50k vocabulary this saves most of the memory and time of the LM head.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LofitValueError
from .model import LofitModel

OBJECTIVE_FIELDS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "dpo": ("prompt", "chosen", "rejected"),
}


class RecordError(LofitValueError):
    """A training record is malformed; the message names the record and the field to fix."""


# ------------------------------------------------------------------------------------ records
def as_records(data: Any, objective: str, name: str = "train_data") -> list[dict[str, str]]:
    """Validate `data` (a list of dicts or a `datasets.Dataset`) and return it as a list of dicts."""
    fields = objective_fields(objective)
    if data is None or isinstance(data, (str, bytes, Mapping)):
        raise RecordError(
            f"{name} must be a list of dicts or a datasets.Dataset with fields {list(fields)}, "
            f"got {type(data).__name__}"
        )
    rows: Iterable[Any] = data
    records: list[dict[str, str]] = []
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise RecordError(
                f"{name}[{index}] is a {type(row).__name__}, not a dict with fields {list(fields)}"
            )
        record = {}
        for key in fields:
            if key not in row:
                raise RecordError(
                    f"{name}[{index}] has no field {key!r}; {objective} records need fields {list(fields)}"
                )
            value = row[key]
            if not isinstance(value, str):
                raise RecordError(f"{name}[{index}][{key!r}] must be a string, got {type(value).__name__}")
            record[key] = value
        records.append(record)
    if not records:
        raise RecordError(f"{name} is empty; training needs at least one {objective} record")
    return records


def train_val_records(
    train_data: Any, val_data: Any, objective: str
) -> tuple[list[dict[str, str]], list[dict[str, str]] | None]:
    """Validated training records, and validation records (None when `val_data` is None or empty)."""
    records = as_records(train_data, objective, "train_data")
    has_val = val_data is not None and len(val_data)
    return records, as_records(val_data, objective, "val_data") if has_val else None


def objective_fields(objective: str) -> tuple[str, ...]:
    if objective not in OBJECTIVE_FIELDS:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVE_FIELDS)}, got {objective!r}")
    return OBJECTIVE_FIELDS[objective]


# --------------------------------------------------------------------------------- tokenising
@dataclass(frozen=True)
class EncodedSequence:
    """Token ids of prompt + response (+ EOS); tokens at index >= `response_start` are scored."""

    input_ids: tuple[int, ...]
    response_start: int

    @property
    def num_targets(self) -> int:
        return len(self.input_ids) - self.response_start


@dataclass
class Example:
    """One training record, encoded: one sequence (SFT) or chosen + rejected (DPO)."""

    index: int
    sequences: tuple[EncodedSequence, ...]
    reference_logps: tuple[float, ...] | None = None  # DPO: the frozen base model's summed log-probs

    @property
    def num_tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.sequences)


class SequenceEncoder:
    """Tokenises prompt/response pairs into `EncodedSequence`s with the boundary found robustly."""

    def __init__(self, tokenizer: Any, max_length: int | None = None) -> None:
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens (or None), got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eos_id: int | None = tokenizer.eos_token_id
        if self.eos_id is None:
            warnings.warn(
                "the tokenizer has no eos_token; responses are scored without a final EOS token",
                stacklevel=2,
            )
        self.num_truncated = 0
        self.num_response_cut = 0  # truncations that cut the response too (not only the prompt)

    def tokenize(self, text: str) -> list[int]:
        return tokenize_text(self.tokenizer, text)

    def num_leading_specials(self, text: str) -> int:
        """How many special tokens (BOS) the tokenizer puts before `text`'s own tokens."""
        with_specials = self.tokenize(text)
        plain = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        extra = len(with_specials) - len(plain)
        return extra if extra > 0 and with_specials[extra:] == plain else 0

    def encode(self, prompt: str, response: str) -> EncodedSequence:
        prompt_ids = self.tokenize(prompt)
        full = self.tokenize(prompt + response)
        start = _common_prefix_length(prompt_ids, full)
        if self.eos_id is not None:
            full.append(self.eos_id)
        if start == 0:
            start = 1  # without BOS and prompt, the first token has no context to be predicted from
        if start >= len(full):
            raise RecordError(f"the response {response!r} produced no tokens to score")
        if self.max_length is not None and len(full) > self.max_length:
            self.num_truncated += 1
            full, start = self._truncate(full, start, self.num_leading_specials(prompt))
        return EncodedSequence(tuple(full), start)

    def _truncate(self, ids: list[int], start: int, num_specials: int) -> tuple[list[int], int]:
        # Drop prompt tokens from the left (after BOS); cut the response on the right only if it alone is
        # too long. At least one context token always stays before the first scored token.
        assert self.max_length is not None
        head, body, response = (
            ids[: min(num_specials, start)],
            ids[min(num_specials, start) : start],
            ids[start:],
        )
        keep_context = max(1 - len(head), 0)
        room = self.max_length - len(head) - len(response)
        if room >= keep_context:
            body = body[len(body) - room :] if room > 0 else []
        else:
            body = body[len(body) - keep_context :]
            response = response[: self.max_length - len(head) - len(body)]
            self.num_response_cut += 1
        return head + body + response, len(head) + len(body)


def tokenize_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids with the tokenizer's leading special tokens (BOS), without an auto-appended EOS."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos_id = tokenizer.eos_token_id
    if ids and eos_id is not None and ids[-1] == eos_id:
        plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not plain or plain[-1] != eos_id:
            ids.pop()  # the tokenizer appends EOS itself (some do); the objectives add it explicitly
    return ids


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


# ------------------------------------------------------------------------------------ batches
@dataclass
class TokenBatch:
    """Right-padded sequences plus the flat list of scored positions.

    Target j is token `targets[j]` of sequence `sequence_index[j]`, predicted from position
    `positions[j]` (= its index - 1) of that sequence.
    """

    input_ids: torch.Tensor  # [S, T]
    attention_mask: torch.Tensor  # [S, T]
    sequence_index: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    targets: torch.Tensor  # [N]

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in self._tensors()))

    def first_sequence(self) -> TokenBatch:
        """The batch cut down to its first sequence (and that sequence's scored positions)."""
        keep = self.sequence_index == 0
        return TokenBatch(
            self.input_ids[:1],
            self.attention_mask[:1],
            self.sequence_index[keep],
            self.positions[keep],
            self.targets[keep],
        )

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.input_ids, self.attention_mask, self.sequence_index, self.positions, self.targets)


def collate(sequences: Sequence[EncodedSequence], pad_token_id: int) -> TokenBatch:
    lengths = torch.tensor([len(s.input_ids) for s in sequences])
    starts = torch.tensor([s.response_start for s in sequences])
    width = int(lengths.max())
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence.input_ids)] = torch.tensor(sequence.input_ids)
    index = torch.arange(width)
    attention_mask = (index[None, :] < lengths[:, None]).long()
    scored = (index[None, :] >= starts[:, None]) & attention_mask.bool()
    sequence_index, token_index = scored.nonzero(as_tuple=True)
    return TokenBatch(
        input_ids, attention_mask, sequence_index, token_index - 1, input_ids[sequence_index, token_index]
    )


def pad_token_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # padded positions are masked out and never scored, so any id works


# ------------------------------------------------------------------------------------ scoring
class TokenScorer:
    """Log-probabilities of a batch's target tokens under a (LoFiT-wrapped) causal LM.

    mode "gathered" runs the decoder body, gathers the hidden states at the scored positions and applies
    the output embedding (and gemma2-style final logit soft-capping) there only; "full" computes all
    logits with the model's own forward. "auto" checks once, on the first batch, that both agree and
    falls back to "full" (with a warning) for architectures whose LM head does something else.
    """

    def __init__(self, model: nn.Module, mode: str = "auto") -> None:
        if mode not in ("auto", "gathered", "full"):
            raise ValueError(f"mode must be 'auto', 'gathered' or 'full', got {mode!r}")
        self.model = model
        self.causal_lm: Any = model.base_model if isinstance(model, LofitModel) else model
        self.mode = mode
        if mode != "full" and not self._has_parts():
            if mode == "gathered":
                raise ValueError(
                    f"{type(self.causal_lm).__name__} has no separate decoder body/output embedding; use mode='full'"
                )
            self.mode = "full"

    def _has_parts(self) -> bool:
        get_decoder = getattr(self.causal_lm, "get_decoder", None)
        get_head = getattr(self.causal_lm, "get_output_embeddings", None)
        if not callable(get_decoder) or not callable(get_head):
            return False
        try:
            decoder, head = get_decoder(), get_head()
        except (AttributeError, NotImplementedError, ValueError):
            return False
        return (
            isinstance(decoder, nn.Module) and decoder is not self.causal_lm and isinstance(head, nn.Module)
        )

    def logits(self, batch: TokenBatch) -> torch.Tensor:
        """[N, vocab] logits at the batch's scored positions."""
        if self.mode == "auto":
            self.mode = "gathered" if self._gathered_matches_full(batch) else "full"
        if self.mode == "gathered":
            return self._gathered_logits(batch)
        return self._full_logits(batch)

    def __call__(self, batch: TokenBatch) -> torch.Tensor:
        """[N] fp32 log-probabilities of the target tokens."""
        logits = self.logits(batch).float()
        return -F.cross_entropy(logits, batch.targets, reduction="none")

    def _gathered_logits(self, batch: TokenBatch) -> torch.Tensor:
        outputs = self.causal_lm.get_decoder()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
        hidden = outputs[0][batch.sequence_index, batch.positions]
        logits = self.causal_lm.get_output_embeddings()(hidden)
        cap = getattr(getattr(self.causal_lm, "config", None), "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _full_logits(self, batch: TokenBatch) -> torch.Tensor:
        outputs = self.causal_lm(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
        return outputs.logits[batch.sequence_index, batch.positions]

    def _gathered_matches_full(self, batch: TokenBatch) -> bool:
        batch = batch.first_sequence()  # one sequence shows whether the LM head is a plain projection; cheap
        was_training = self.causal_lm.training
        self.causal_lm.eval()  # dropout would make the two passes differ
        try:
            with torch.no_grad():
                gathered = self._gathered_logits(batch)
                full = self._full_logits(batch)
        finally:
            self.causal_lm.train(was_training)
        exact = gathered.dtype == full.dtype == torch.float32 and self.causal_lm.dtype == torch.float32
        tolerance = 1e-4 if exact else 2e-2  # bf16/fp16 matmuls round differently for [N, h] and [S, T, h]
        gathered, full = gathered.float(), full.float()
        finite = full[torch.isfinite(full)]
        scale = float(finite.abs().max()) if finite.numel() else 1.0
        if gathered.shape == full.shape and bool(
            torch.isclose(gathered, full, rtol=0.0, atol=tolerance * max(scale, 1.0), equal_nan=True).all()
        ):
            return True
        warnings.warn(
            f"{type(self.causal_lm).__name__}: logits from the decoder body + output embedding differ from the "
            "model's own logits; computing full logits (slower, more memory)",
            stacklevel=2,
        )
        return False


def sequence_logps(token_logps: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Sum the target log-probs per sequence: [num_sequences]."""
    # Scatter into [S, T] (each slot written once) and sum rows: unlike index_add, deterministic on GPU.
    grid = token_logps.new_zeros(batch.input_ids.shape)
    grid = grid.index_put((batch.sequence_index, batch.positions), token_logps)
    return grid.sum(1)


# ------------------------------------------------------------------------------------- losses
def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair sigmoid DPO loss: -log σ(β[(π_c − r_c) − (π_r − r_r)]) on summed log-probs."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin)


@dataclass
class LossOutput:
    """Sums over a micro-batch; the trainer divides by the global batch's `units`."""

    loss_sum: torch.Tensor
    units: int
    metric_sums: dict[str, float] = field(default_factory=dict)


class Objective:
    """Encodes records and computes a batch's summed loss; `units` is what the batch mean divides by."""

    name = ""
    metric_names: tuple[str, ...] = ()  # extra per-unit metrics that `loss` sums

    def __init__(self, tokenizer: Any, max_length: int | None = None) -> None:
        self.encoder = SequenceEncoder(tokenizer, max_length)
        self.pad_token_id = pad_token_id(tokenizer)

    def encode(self, records: Sequence[Mapping[str, str]]) -> list[Example]:
        """Tokenise every record (warning once if any sequence had to be cut to max_length)."""
        before, cut_before = self.encoder.num_truncated, self.encoder.num_response_cut
        examples = [Example(i, self.encode_record(record)) for i, record in enumerate(records)]
        truncated = self.encoder.num_truncated - before
        response_cut = self.encoder.num_response_cut - cut_before
        if truncated:
            what = (
                f"prompt cut from the left; in {response_cut} of them the completion/response alone was "
                "longer, so it was cut on the right too: raise --max-length"
                if response_cut
                else "prompt cut from the left"
            )
            warnings.warn(
                f"{truncated} of {sum(len(e.sequences) for e in examples)} sequences exceed "
                f"max_length={self.encoder.max_length} tokens and were truncated ({what})",
                stacklevel=2,
            )
        return examples

    def encode_record(self, record: Mapping[str, str]) -> tuple[EncodedSequence, ...]:
        raise NotImplementedError

    def units(self, example: Example) -> int:
        raise NotImplementedError

    def prepare(self, scorer: TokenScorer, examples: Sequence[Example], batch_size: int, device: Any) -> None:
        """Work needed once before training (DPO: cache the reference log-probs)."""

    def loss(self, scorer: TokenScorer, examples: Sequence[Example], device: Any) -> LossOutput:
        raise NotImplementedError

    def batch(self, examples: Sequence[Example]) -> TokenBatch:
        return collate([s for example in examples for s in example.sequences], self.pad_token_id)


class SFTObjective(Objective):
    """Token-level cross-entropy on completion + EOS, averaged over all scored tokens of the batch."""

    name = "sft"

    def encode_record(self, record: Mapping[str, str]) -> tuple[EncodedSequence, ...]:
        return (self.encoder.encode(record["prompt"], record["completion"]),)

    def units(self, example: Example) -> int:
        return example.sequences[0].num_targets

    def loss(self, scorer: TokenScorer, examples: Sequence[Example], device: Any) -> LossOutput:
        batch = self.batch(examples).to(device)
        token_logps = scorer(batch)
        return LossOutput(-token_logps.sum(), int(token_logps.numel()))


class DPOObjective(Objective):
    """Sigmoid DPO against the frozen base model, averaged over pairs."""

    name = "dpo"
    metric_names = ("reward_margin", "reward_accuracy")

    def __init__(self, tokenizer: Any, max_length: int | None = None, beta: float = 0.5) -> None:
        super().__init__(tokenizer, max_length)
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta = float(beta)

    def encode_record(self, record: Mapping[str, str]) -> tuple[EncodedSequence, ...]:
        prompt = record["prompt"]
        return (
            self.encoder.encode(prompt, record["chosen"]),
            self.encoder.encode(prompt, record["rejected"]),
        )

    def units(self, example: Example) -> int:
        return 1

    def prepare(self, scorer: TokenScorer, examples: Sequence[Example], batch_size: int, device: Any) -> None:
        missing = [e for e in examples if e.reference_logps is None]
        if not missing:
            return
        model = scorer.model
        context = model.disable_adapter() if isinstance(model, LofitModel) else contextlib.nullcontext()
        with context, torch.no_grad():
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                batch = self.batch(chunk).to(device)
                logps = sequence_logps(scorer(batch), batch).view(len(chunk), 2).cpu().tolist()
                for example, pair in zip(chunk, logps, strict=True):
                    example.reference_logps = (pair[0], pair[1])

    def loss(self, scorer: TokenScorer, examples: Sequence[Example], device: Any) -> LossOutput:
        if any(e.reference_logps is None for e in examples):
            raise RuntimeError(
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
            metrics = {
                "reward_margin": float(rewards.sum()),
                "reward_accuracy": float((rewards > 0).sum()),
            }
        return LossOutput(losses.sum(), len(examples), metrics)


def make_objective(
    objective: str, tokenizer: Any, max_length: int | None = None, beta: float = 0.5
) -> Objective:
    """The objective named "sft" or "dpo"."""
    objective_fields(objective)
    if objective == "dpo":
        return DPOObjective(tokenizer, max_length, beta)
    return SFTObjective(tokenizer, max_length)


def encode_train_val(
    objective: str,
    tokenizer: Any,
    records: Sequence[Mapping[str, str]],
    val_records: Sequence[Mapping[str, str]] | None,
    max_length: int | None = None,
    beta: float = 0.5,
) -> tuple[Objective, list[Example], list[Example] | None]:
    """The objective named `objective` and the encoded training (and validation) examples."""
    task = make_objective(objective, tokenizer, max_length, beta)
    return task, task.encode(records), task.encode(val_records) if val_records else None


def loss_sums(
    objective: Objective, scorer: TokenScorer, examples: Sequence[Example], batch_size: int, device: Any
) -> dict[str, float]:
    """{"loss": summed loss, "units": its count, metric sums...} over `examples`, without gradients."""
    objective.prepare(scorer, examples, batch_size, device)
    # Every key is present even for an empty shard, so processes can all-reduce the same vector.
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
    objective: Objective, scorer: TokenScorer, examples: Sequence[Example], batch_size: int, device: Any
) -> dict[str, float]:
    """The objective's mean loss (and metric means) over `examples`, without gradients."""
    return sums_to_means(loss_sums(objective, scorer, examples, batch_size, device))


def sums_to_means(sums: dict[str, float]) -> dict[str, float]:
    units = max(sums["units"], 1.0)
    return {key: value / units for key, value in sums.items() if key != "units"}
