"""The training loss curve (`loss.png`): train loss per step, validation loss per epoch, L1 penalty."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io.figures import save_figure
from .history import TrainingHistory


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
    save_figure(figure, path)
