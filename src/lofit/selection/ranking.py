"""`HeadSelection`: step 1's result, every head's score and the ranking (best first), saved as heads.json.

Example:
    >>> import torch
    >>> scores = torch.tensor([[0.1, 0.9], [0.5, 0.2]])
    >>> HeadSelection(scores, rank_heads(scores), "lofit").top_heads(2)
    [(0, 1), (1, 0)]
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters.config import HeadMap
from ..errors import LofitValueError
from ..io.atomic import atomic_write_json

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
