"""PNG figures written atomically, drawn on matplotlib's Agg canvas (no pyplot).

Nothing touches the user's matplotlib backend or global figure state.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import atomic_write_with

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def save_figure(figure: Figure, path: str | Path) -> None:
    """Render `figure` on an Agg canvas and write it to `path` as a PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    atomic_write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
