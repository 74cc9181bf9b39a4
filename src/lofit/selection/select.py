"""Step 1 of LoFiT: rank every attention head (`select_heads`) and keep the ranking (`HeadSelection`).

Methods: "lofit" trains a scale A on every head with an L1 penalty and ranks by ‖A‖₂; "probe" ranks by
the validation accuracy of ITI-style per-head linear probes; "random" is a seeded random ranking;
"gradient" ranks by the norm of the loss gradient w.r.t. each head's scale at A = 0, in one pass
(`lofit.selection.gradient`); "gradient-adam" ranks, from the same pass, by the rate at which step 1's
Adam + L1 (λ = `l1`) would move each scale element (closer to the L1 ranking, as cheap). The base model is handed back exactly as it came (weights bit-identical,
same requires_grad, mode, device).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapters.base_state import check_plain_model, preserved_base_model
from ..adapters.config import HeadMap, LofitConfig
from ..adapters.heads import HeadGeometry, find_output_projections
from ..adapters.model import LofitModel, get_lofit_model
from ..errors import LofitValueError
from ..io.atomic import atomic_write_json
from ..tasks.defaults import SELECT_HEADS_DEFAULTS
from ..tasks.records import Record, train_val_records
from ..training.config import TrainingConfig
from ..training.distributed import seed_everything
from ..training.loop import train_adapter
from ..training.losses import encode_train_val
from .gradient import gradient_head_scores
from .probe import probe_selection_scores
from .probe import probe_texts as probe_texts  # re-exported: the paper-tables benchmark reads it here

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

METHODS = ("lofit", "random", "probe", "gradient", "gradient-adam")
SCORE_MEANING = {
    "lofit": "L2 norm of the head's scale A after L1-regularised training",
    "probe": "validation accuracy of the head's logistic-regression probe (ties: lower validation loss)",
    "random": "uniform random number (seeded)",
    "gradient": "L2 norm of the mean task-loss gradient w.r.t. the head's scale A at A = 0 (one pass)",
    "gradient-adam": "L2 norm over the head's scale elements of max(0, |mean gradient| - l1) / RMS of the "
    "per-batch gradients at A = 0 (one pass)",
}
FORMAT_NAME = "lofit-head-selection"
FORMAT_VERSION = 1


class SelectionFileError(LofitValueError):
    """A saved head selection cannot be read; the message names the file and the field."""


# ------------------------------------------------------------------------------ HeadSelection
@dataclass
class HeadSelection:
    """Scores of every head ([layers, heads]) and the full ranking, best first.

    >>> sel = HeadSelection(torch.tensor([[0.1, 0.9], [0.5, 0.2]]), [(0, 1), (1, 0), (1, 1), (0, 0)], "lofit")
    >>> sel.top(2)
    {0: [1], 1: [0]}
    """

    scores: torch.Tensor
    ranking: list[tuple[int, int]]
    method: str
    metadata: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32).detach().cpu()
        if self.scores.dim() != 2 or self.scores.numel() == 0:
            raise LofitValueError(
                f"scores must be a non-empty [layers, heads] matrix, got shape {tuple(self.scores.shape)}"
            )
        if not torch.isfinite(self.scores).all():
            raise LofitValueError("scores contain NaN or inf values")
        ranking = []
        for entry in self.ranking:
            if len(entry) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in entry):
                raise LofitValueError(f"ranking entries must be (layer, head) integer pairs, got {entry!r}")
            ranking.append((int(entry[0]), int(entry[1])))
        expected = {(layer, head) for layer in range(self.num_layers) for head in range(self.num_heads)}
        if len(ranking) != len(expected) or set(ranking) != expected:
            raise LofitValueError(
                f"ranking must list each of the {len(expected)} heads of a {self.num_layers}x{self.num_heads} "
                f"model exactly once; got {len(ranking)} entries ({len(set(ranking) & expected)} valid, distinct)"
            )
        self.ranking = ranking

    @property
    def num_layers(self) -> int:
        """Rows of `scores`: the model's decoder layers."""
        return int(self.scores.shape[0])

    @property
    def num_heads(self) -> int:
        """Columns of `scores`: attention heads per layer."""
        return int(self.scores.shape[1])

    @property
    def total_heads(self) -> int:
        """All heads of the model (layers x heads)."""
        return self.num_layers * self.num_heads

    def count(self, k: int | float) -> int:
        """Number of heads that `k` asks for: an int count, or a float fraction in (0, 1] of all heads."""
        total = self.total_heads
        if isinstance(k, bool) or not isinstance(k, numbers.Real):
            raise TypeError(f"k must be an int (number of heads) or a float in (0, 1], got {k!r}")
        if isinstance(k, numbers.Integral):
            k = int(k)
            if not 1 <= k <= total:
                raise LofitValueError(
                    f"k={k} heads is out of range; this model has {total} heads (use 1..{total})"
                )
            return k
        k = float(k)
        if not (math.isfinite(k) and 0 < k <= 1):
            raise LofitValueError(
                f"k={k} as a fraction of all heads must be in (0, 1]; for a count pass an int"
            )
        return max(1, math.floor(k * total + 0.5))

    def top_heads(self, k: int | float) -> list[tuple[int, int]]:
        """The best `k` heads as (layer, head) pairs, best first."""
        return self.ranking[: self.count(k)]

    def top(self, k: int | float) -> HeadMap:
        """The best `k` heads as {layer: [heads]} (layers and heads sorted), ready for `train_offsets`."""
        heads: HeadMap = {}
        for layer, head in self.top_heads(k):
            heads.setdefault(layer, []).append(head)
        return {layer: sorted(heads[layer]) for layer in sorted(heads)}

    def to_dict(self) -> dict[str, Any]:
        """The JSON document `save` writes (format, version, scores, ranking, metadata, history)."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "method": self.method,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "scores": self.scores.tolist(),
            "ranking": [list(entry) for entry in self.ranking],
            "metadata": self.metadata,
            "history": self.history,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the selection as JSON (atomically)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], revision: str | None = None, token: str | bool | None = None
    ) -> HeadSelection:
        """Read a selection written by `save` (a file, a folder's heads.json or a Hub repo id's), checking every field."""
        from ..adapters.hub import resolve_selection_file

        path = resolve_selection_file(path, revision, token)
        if not path.is_file():
            raise SelectionFileError(f"{path}: no such head-selection file (write one with `lofit select`)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SelectionFileError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise SelectionFileError(
                f"{path}: not a head-selection file (its 'format' is not {FORMAT_NAME!r})"
            )
        if data.get("version") != FORMAT_VERSION:
            raise SelectionFileError(
                f"{path}: head-selection format version {data.get('version')!r} is not supported "
                f"(this lofit reads version {FORMAT_VERSION})"
            )
        for key in ("method", "scores", "ranking"):
            if key not in data:
                raise SelectionFileError(f"{path}: missing field {key!r}")
        try:
            scores = torch.tensor(data["scores"], dtype=torch.float32)
            ranking = [tuple(entry) for entry in data["ranking"]]
            selection = cls(
                scores, ranking, str(data["method"]), data.get("metadata") or {}, data.get("history")
            )
        except (TypeError, ValueError) as error:
            raise SelectionFileError(f"{path}: {error}") from None
        for key in ("num_layers", "num_heads"):
            if key in data and data[key] != getattr(selection, key):
                raise SelectionFileError(f"{path}: {key}={data[key]} does not match the scores' shape")
        return selection

    def plot(
        self, path: str | os.PathLike[str], k: int | float | None = None, title: str | None = None
    ) -> None:
        """Layers x heads heatmap of the scores (PNG); with `k`, the selected heads are boxed."""
        from .heatmap import plot_head_scores

        selected = self.top(k) if k is not None else None
        plot_head_scores(self.scores, Path(path), selected, title or f"head scores ({self.method})")


def rank_heads(scores: torch.Tensor, tiebreak: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """Every (layer, head), by score descending; ties by `tiebreak` ascending, then by position."""
    num_heads = scores.shape[1]
    flat = scores.flatten().tolist()
    second = tiebreak.flatten().tolist() if tiebreak is not None else [0.0] * len(flat)
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], second[i], i))
    return [(i // num_heads, i % num_heads) for i in order]


# ------------------------------------------------------------------------------ select_heads
def select_heads(
    base_model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_data: Any,
    method: str = "lofit",
    objective: str = "sft",
    **train_kwargs: Any,
) -> HeadSelection:
    """Step 1 of LoFiT: rank every attention head of `base_model` for the task in `train_data`.

    Args:
        base_model: a plain Hugging Face causal LM; handed back exactly as it came.
        tokenizer: its tokenizer.
        train_data: records {"prompt", "completion"} (SFT) or {"prompt", "chosen", "rejected"} (DPO).
        method: "lofit" (L1-regularised scales, ranked by ‖A‖₂), "probe" (ITI-style probes), "random",
            "gradient" or "gradient-adam" (one gradient pass at A = 0; see `lofit.selection.gradient`).
        objective: "sft" or "dpo".
        **train_kwargs: `val_data`, `probe_l2` (1.0, method "probe"), `target_modules` and the
            `TrainingConfig` fields (epochs=5, batch_size=8, lr=5e-3, l1=5e-4, beta=0.5, max_length,
            seed=42, grad_accum, precision, init_std=1e-3, output_dir, ...). Methods "random" and "probe"
            accept the training options and ignore those they do not use.

    Returns:
        The `HeadSelection`: every head's score and the ranking; `.top(k)` gives the heads for step 2.
    """
    if method not in METHODS:
        raise LofitValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    val_data = train_kwargs.pop("val_data", None)
    probe_l2 = float(train_kwargs.pop("probe_l2", 1.0))
    target_modules = train_kwargs.pop("target_modules", None)
    config = TrainingConfig.from_kwargs(train_kwargs, owner="select_heads", **SELECT_HEADS_DEFAULTS)
    check_plain_model(base_model, "select_heads")
    records, val_records = train_val_records(train_data, val_data, objective)
    target_modules = LofitConfig(target_modules=target_modules).target_modules  # validated
    geometry = find_output_projections(base_model, target_modules)
    metadata = _selection_metadata(method, objective, records, val_records, geometry, config, target_modules)
    if method == "random":
        generator = torch.Generator().manual_seed(config.seed)
        scores = torch.rand(geometry.num_layers, geometry.num_heads, generator=generator)
        return HeadSelection(scores, rank_heads(scores), method, metadata)
    if method in ("gradient", "gradient-adam"):
        with preserved_base_model(base_model):
            scores, info = gradient_head_scores(
                base_model, tokenizer, records, objective, config, target_modules
            )
        if method == "gradient-adam":
            scores = _adam_scores(info, config.l1)
        return HeadSelection(scores, rank_heads(scores), method, {**metadata, "gradient": info})
    if method == "probe":
        accuracy, loss = probe_selection_scores(
            base_model, tokenizer, records, val_records, objective, config, probe_l2, metadata
        )
        return HeadSelection(accuracy, rank_heads(accuracy, loss), "probe", metadata)
    scores, history = _select_by_lofit(
        base_model, tokenizer, records, val_records, objective, config, target_modules
    )
    return HeadSelection(scores, rank_heads(scores), method, metadata, history)


def _adam_scores(info: dict[str, Any], l1: float) -> torch.Tensor:
    """The "gradient-adam" scores of a gradient pass; refused when λ silences every head."""
    scores = torch.tensor(info["adam_scores"])
    if not bool((scores > 0).any()):
        raise LofitValueError(
            f"method 'gradient-adam' scored every head 0: l1={l1:g} is larger than every element of the "
            "loss gradient, so no scale would move; lower l1 (the tasks use 5e-4 to 1e-3)"
        )
    return scores


def _selection_metadata(
    method: str,
    objective: str,
    records: list[Record],
    val_records: list[Record] | None,
    geometry: HeadGeometry,
    config: TrainingConfig,
    target_modules: list[str] | None,
) -> dict[str, Any]:
    """What heads.json records about how a selection was made."""
    metadata: dict[str, Any] = {
        "objective": objective,
        "num_train": len(records),
        "num_val": len(val_records or []),
        "model_type": geometry.model_type,
        "score": SCORE_MEANING[method],
        "settings": {k: v for k, v in vars(config).items() if k not in ("output_dir", "progress")},
    }
    if target_modules is not None:
        metadata["target_modules"] = target_modules
    return metadata


def _select_by_lofit(
    base_model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: list[Record],
    val_records: list[Record] | None,
    objective: str,
    config: TrainingConfig,
    target_modules: list[str] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    task, train_examples, val_examples = encode_train_val(
        objective, tokenizer, records, val_records, config.max_length, config.beta
    )
    with preserved_base_model(base_model):
        seed_everything(config.seed)
        adapter = LofitConfig(
            heads=None,
            use_scale=True,
            use_offset=False,
            init_std=config.init_std,
            target_modules=target_modules,
        )
        model = get_lofit_model(base_model, adapter)
        try:
            scales = model.adapter_parameters(kind="scale")
            l1 = config.l1

            def penalty() -> torch.Tensor:  # λ Σ|A| over every element of every head's scale
                return l1 * torch.stack([scale.abs().sum() for scale in scales]).sum()

            history = train_adapter(
                model,
                task,
                train_examples,
                config,
                val_examples=val_examples,
                regularizer=penalty if l1 > 0 else None,
                description="select heads",
            )
            scores = _scale_norms(model, model.geometry)
        finally:
            model.unload()
    return scores, history.to_dict()


def _scale_norms(model: LofitModel, geometry: HeadGeometry) -> torch.Tensor:
    scores = torch.zeros(geometry.num_layers, geometry.num_heads)
    for layer, vectors in model.adapter_vectors().items():
        assert vectors.scale is not None
        scores[layer, vectors.heads.cpu()] = vectors.scale.detach().float().norm(dim=-1).cpu()
    return scores
