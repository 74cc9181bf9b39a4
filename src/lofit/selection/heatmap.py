"""The head-score heatmap (`heads.png`): a [layers, heads] score matrix, the selected heads boxed."""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapters.config import HeadMap
from ..io.figures import save_figure


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
    save_figure(figure, path)
