"""report.md: a readable summary of one `lofit run`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .atomic import atomic_write_text


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{100 * value:.1f}" if 0.0 <= value <= 1.0 else f"{value:.4g}"
    return str(value)


def metrics_table(base: dict[str, Any], lofit: dict[str, Any]) -> str:
    names = [name for name in lofit if isinstance(lofit[name], (int, float))]
    lines = ["| metric | base model | LoFiT | change |", "|---|---:|---:|---:|"]
    for name in names:
        before, after = base.get(name), lofit[name]
        change = (
            f"{100 * (after - before):+.1f}"
            if isinstance(before, float) and isinstance(after, float) and abs(after) <= 1 and abs(before) <= 1
            else ""
        )
        lines.append(f"| {name} | {_number(before)} | {_number(after)} | {change} |")
    return "\n".join(lines)


def validation_table(validation: dict[str, Any]) -> list[str]:
    """Validation loss after each epoch (epoch 0 = before training) of both steps, if there was any."""
    select = dict((int(e), loss) for e, loss in validation.get("select", []))
    train = dict((int(e), loss) for e, loss in validation.get("train", []))
    if not (select or train):
        return []
    lines = ["| epoch | head selection val loss | offset training val loss |", "|---:|---:|---:|"]
    for epoch in sorted(set(select) | set(train)):
        cells = [f"{losses[epoch]:.4f}" if epoch in losses else "" for losses in (select, train)]
        lines.append(f"| {epoch} | {cells[0]} | {cells[1]} |")
    return ["Validation loss after each epoch (0 = before training):", "", *lines, ""]


def _image(out: Path, relative: str, caption: str) -> str:
    return f"![{caption}]({relative})\n" if (out / relative).exists() else f"({caption}: not written)\n"


def render_report(out: Path, metrics: dict[str, Any]) -> str:
    settings = metrics.get("settings", {})
    timings = metrics.get("timings", {})
    heads = metrics.get("heads", [])
    head_list = ", ".join(f"L{layer}.H{head}" for layer, head in heads[:60]) + (
        " ..." if len(heads) > 60 else ""
    )
    counts = metrics.get("counts", {})
    environment = metrics.get("environment", {})
    parts = [
        f"# LoFiT on {metrics.get('task')} with {metrics.get('model')}",
        "",
        "Scores are percentages on the test split"
        + (f" (fold {settings['fold']})" if settings.get("fold") is not None else "")
        + f"; {counts.get('train')} training, {counts.get('val')} validation and {counts.get('test')} test records.",
        "",
        "## Results",
        "",
        metrics_table(metrics.get("base", {}), metrics.get("lofit", {})),
        "",
        f"Trainable parameters: **{metrics.get('trainable_params'):,}** (offsets on "
        f"{metrics.get('num_heads_selected')} of {metrics.get('total_heads')} heads).",
        "",
        "## Selected heads",
        "",
        head_list,
        "",
        _image(out, "heads.png", "head scores (selected heads marked)"),
        "## Training",
        "",
        f"- head selection ({settings.get('select', {}).get('method')}): `{settings.get('select')}`",
        f"- offset training: `{settings.get('train')}`",
        f"- k: {settings.get('k')}",
        "",
        *validation_table(metrics.get("validation", {})),
        _image(out, "select/loss_curve.png", "head selection loss"),
        _image(out, "train/loss_curve.png", "offset training loss"),
        "## Time",
        "",
        "| step | seconds |",
        "|---|---:|",
        *[f"| {name.removesuffix('_s')} | {seconds:.1f} |" for name, seconds in timings.items()],
        "",
        "## Environment",
        "",
        *[f"- {key}: `{value}`" for key, value in environment.items()],
        "",
    ]
    return "\n".join(parts)


def write_report(out: Path, metrics: dict[str, Any]) -> Path:
    path = Path(out) / "report.md"
    atomic_write_text(path, render_report(Path(out), metrics))
    return path
