"""ITI-style linear probes, and head selection by them (`select_heads(..., method="probe")`).

One logistic regression per attention head, all heads fitted at once.

Each head's features are standardised on the training set, then an L2-regularised logistic regression
(sklearn's objective with C = 1/l2: Σ log-loss + l2/2·‖w‖², bias unpenalised) is solved by batched
Newton steps with a small per-head line search: one [P, d+1, d+1] linear solve per iteration for all P
heads instead of a Python loop of per-head fits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LofitValueError
from ..tasks.records import Record
from ..training.settings import TrainingConfig
from .selectors import SelectionRequest, SelectorScores

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

STEP_SIZES = (1.0, 0.5, 0.25, 0.125, 0.0625)


@dataclass
class ProbeFit:
    """Fitted probes for P heads: logits = ((x − mean) / std) · weight + bias (fp32)."""

    weight: torch.Tensor  # [P, d]
    bias: torch.Tensor  # [P]
    mean: torch.Tensor  # [P, d]
    std: torch.Tensor  # [P, d]
    iterations: int

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[N, P] probe logits for features x [N, P, d]."""
        standardized = (x.float() - self.mean) / self.std
        return torch.einsum("npd,pd->np", standardized, self.weight) + self.bias

    def accuracy(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[P] fraction of the N examples each head's probe classifies correctly."""
        predictions = self.logits(x) > 0
        return (predictions == labels.bool()[:, None]).float().mean(0)

    def log_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[P] mean binary cross-entropy of each head's probe."""
        logits = self.logits(x)
        targets = labels.float()[:, None].expand_as(logits)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(0)


def _objective(
    design: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    z = torch.bmm(design, w.unsqueeze(-1)).squeeze(-1)  # [P, N]
    return (F.softplus(z) - labels * z).sum(1) + 0.5 * (penalty * w * w).sum(1)


def fit_logistic_probes(
    x: torch.Tensor, labels: torch.Tensor, *, l2: float = 1.0, max_iter: int = 50, tol: float = 1e-8
) -> ProbeFit:
    """Fit one logistic regression per head on features x [N, P, d] with binary labels [N]."""
    if x.dim() != 3 or labels.shape != (x.shape[0],):
        raise ValueError(
            f"expected features [N, P, d] and labels [N], got {tuple(x.shape)} and {tuple(labels.shape)}"
        )
    classes = set(labels.tolist())
    if not classes <= {0, 1} or len(classes) < 2:
        raise ValueError(f"probe labels must contain both classes 0 and 1, got {sorted(classes)}")
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    # float64: the summed log-loss is O(N), so float32 cannot see the last Newton steps' improvement.
    x = x.double()
    num_examples, num_probes, dim = x.shape
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # constant features stay 0 after centring
    standardized = ((x - mean) / std).permute(1, 0, 2)  # [P, N, d]
    design = torch.cat([standardized, standardized.new_ones(num_probes, num_examples, 1)], dim=-1)
    target = labels.to(device=x.device, dtype=x.dtype)[None, :]
    penalty = torch.full((dim + 1,), float(l2), device=x.device, dtype=x.dtype)
    penalty[-1] = 1e-10  # the bias is (practically) unpenalised, as in sklearn
    w = x.new_zeros(num_probes, dim + 1)
    loss = _objective(design, target, w, penalty)
    iteration = 0
    for iteration in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        p = torch.sigmoid(torch.bmm(design, w.unsqueeze(-1)).squeeze(-1))
        grad = torch.bmm(design.transpose(1, 2), (p - target).unsqueeze(-1)).squeeze(-1) + penalty * w
        if float(grad.abs().max()) < tol:
            break
        hessian = torch.bmm(design.transpose(1, 2), design * (p * (1 - p)).unsqueeze(-1))
        hessian = hessian + torch.diag_embed(penalty.expand(num_probes, -1))
        step = torch.linalg.solve(hessian, grad)
        # Per-head backtracking: the largest step size that does not raise that head's loss.
        accepted = torch.zeros(num_probes, dtype=torch.bool, device=x.device)
        new_w, new_loss = w.clone(), loss.clone()
        for size in STEP_SIZES:
            candidate = w - size * step
            candidate_loss = _objective(design, target, candidate, penalty)
            take = ~accepted & (candidate_loss <= loss)
            new_w = torch.where(take[:, None], candidate, new_w)
            new_loss = torch.where(take, candidate_loss, new_loss)
            accepted |= take
        w, loss = new_w, new_loss
        if not bool(accepted.any()):
            break
    w = w.float()
    return ProbeFit(w[:, :dim], w[:, dim], mean.float(), std.float(), iteration)


@dataclass
class ProbeScores:
    """Per-head probe quality, each [layers, heads]."""

    val_accuracy: torch.Tensor
    val_loss: torch.Tensor
    train_accuracy: torch.Tensor


def probe_head_scores(
    train_x: torch.Tensor,
    train_labels: torch.Tensor,
    val_x: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    l2: float = 1.0,
) -> ProbeScores:
    """Fit a probe per head on [N, L, H, d] activations and score it on the validation activations."""
    num_layers, num_heads = train_x.shape[1:3]
    fit = fit_logistic_probes(train_x.flatten(1, 2), train_labels, l2=l2)
    val_flat = val_x.flatten(1, 2)
    shape = (num_layers, num_heads)
    return ProbeScores(
        val_accuracy=fit.accuracy(val_flat, val_labels).view(shape),
        val_loss=fit.log_loss(val_flat, val_labels).view(shape),
        train_accuracy=fit.accuracy(train_x.flatten(1, 2), train_labels).view(shape),
    )


# ------------------------------------------------------------------------------ probe selection
def select(request: SelectionRequest) -> SelectorScores:
    """Selector "probe": scores are the probes' validation accuracy, ties broken by lower validation loss."""
    accuracy, loss = probe_selection_scores(
        request.base_model,
        request.tokenizer,
        request.records,
        request.val_records,
        request.objective,
        request.config,
        request.probe_l2,
        request.metadata,
    )
    return SelectorScores(accuracy, tiebreak=loss)


def probe_selection_scores(
    base_model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: list[Record],
    val_records: list[Record] | None,
    objective: str,
    config: TrainingConfig,
    l2: float,
    metadata: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every head by its probe: (validation accuracy, validation loss), each [layers, heads].

    The probe of a head tells the true text of a record (`probe_texts`) from a false one by the head's
    activation at the last token. Without `val_records`, a seeded 20% of `records` scores the probes.
    What was done is written into `metadata` (under "probe" and "probe_validation").
    """
    if val_records is None:
        records, val_records = _split_validation(records, config.seed, metadata)
    positives, negatives = probe_texts(records + val_records, objective, config.seed)
    split = len(records)
    features = _ProbeFeatures(base_model, tokenizer, config, metadata.get("target_modules"))
    train_x, train_y = features.labelled(positives[:split], negatives[:split])
    val_x, val_y = features.labelled(positives[split:], negatives[split:])
    result = probe_head_scores(train_x, train_y, val_x, val_y, l2=l2)
    metadata["probe"] = {
        "l2": l2,
        "num_train_examples": len(train_y),
        "num_val_examples": len(val_y),
        "negatives": "rejected responses" if objective == "dpo" else "another record's completion (seeded)",
        "val_loss": result.val_loss.tolist(),
        "train_accuracy": result.train_accuracy.tolist(),
    }
    return result.val_accuracy, result.val_loss


def _split_validation(
    records: list[Record], seed: int, metadata: dict[str, Any]
) -> tuple[list[Record], list[Record]]:
    if len(records) < 2:
        raise LofitValueError(
            "probe selection needs at least 2 train records (or val_data) to score the probes"
        )
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    num_val = min(len(records) - 1, max(1, math.floor(0.2 * len(records) + 0.5)))
    metadata["probe_validation"] = f"seeded 20% of train_data ({num_val} records)"
    return [records[i] for i in sorted(order[num_val:])], [records[i] for i in sorted(order[:num_val])]


@dataclass
class _ProbeFeatures:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    config: TrainingConfig
    target_modules: list[str] | None

    def labelled(self, pos: Sequence[str], neg: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations of the positive then negative texts, with labels 1 and 0."""
        from .activations import text_head_activations

        x = text_head_activations(
            self.model,
            self.tokenizer,
            [*pos, *neg],
            batch_size=self.config.validation_batch_size,
            max_length=self.config.max_length,
            target_modules=self.target_modules,
        )
        return x, torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).long()


def probe_texts(records: Sequence[Record], objective: str, seed: int) -> tuple[list[str], list[str]]:
    """(true, false) texts per record, the ITI-style contrast a probe learns.

    DPO: prompt + chosen / prompt + rejected. SFT: prompt + its completion / prompt + a different
    record's completion (a seeded pick).

    Example:
        >>> records = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6"}]
        >>> probe_texts(records, "sft", seed=0)
        (['2+2=4', '3+3=6'], ['2+2=6', '3+3=4'])
    """
    if objective == "dpo":
        return [r["prompt"] + r["chosen"] for r in records], [r["prompt"] + r["rejected"] for r in records]
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    negatives: list[str] = [""] * len(records)
    for position, index in enumerate(order):
        own = records[index]["completion"]
        for shift in range(1, len(records)):
            other = records[order[(position + shift) % len(records)]]["completion"]
            if other != own:
                negatives[index] = records[index]["prompt"] + other
                break
        else:
            raise LofitValueError(
                "probe selection with SFT records needs at least two different completions (the probe "
                "contrasts a record's own completion with another record's)"
            )
    return [r["prompt"] + r["completion"] for r in records], negatives
