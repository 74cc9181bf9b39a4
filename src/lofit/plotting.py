"""PNG figures: the head-score heatmap and the training loss curve.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing touches the user's
backend or global figure state, and every file is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .atomic import atomic_write_with
from .config import HeadMap
from .training.history import TrainingHistory

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _save(figure: Figure, path: str | Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    atomic_write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_head_scores(
    scores: torch.Tensor, path: str | Path, selected: HeadMap | None = None, title: str | None = None
) -> None:
    """Heatmap of a [layers, heads] score matrix; heads in `selected` get a box."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    values = scores.detach().float().cpu().numpy()
    num_layers, num_heads = values.shape
    figure = Figure(figsize=(min(2 + 0.35 * num_heads, 16), min(1.5 + 0.3 * num_layers, 14)))
    axes = figure.add_subplot()
    image = axes.imshow(values, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=axes, label="score")
    for layer, heads in (selected or {}).items():
        for head in heads:
            axes.add_patch(
                Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5)
            )
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    count = sum(len(h) for h in (selected or {}).values())
    suffix = f" (boxes: top {count})" if count else ""
    axes.set_title((title or "head scores") + suffix)
    _save(figure, path)


def plot_loss_curve(
    history: TrainingHistory | dict[str, Any], path: str | Path, title: str | None = None
) -> None:
    """Training loss per step, validation loss per epoch, and the L1 penalty when there is one."""
    from matplotlib.figure import Figure

    data = history if isinstance(history, dict) else history.to_dict()
    steps, validation = data.get("steps", []), data.get("validation", [])
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    axes.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss", linewidth=1)
    if validation:
        axes.plot(
            [r["step"] for r in validation],
            [r["val_loss"] for r in validation],
            "o-",
            label="validation loss",
        )
    if steps and "penalty" in steps[0]:
        twin = axes.twinx()
        twin.plot([r["step"] for r in steps], [r["penalty"] for r in steps], color="gray", linestyle="--")
        twin.set_ylabel("L1 penalty (dashed)")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(title or "training")
    axes.legend(loc="upper right")
    _save(figure, path)
