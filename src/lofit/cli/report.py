"""report.md: a readable summary of one `lofit run`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io.atomic import atomic_write_text


def _is_fraction(value: Any) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def _number(value: Any, se: float | None = None, interval: Any = None) -> str:
    if _is_fraction(value):
        if se == 0 and interval is not None:  # 0% or 100%: the SE says nothing, the interval does
            return f"{100 * value:.1f} [95%: {100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"
        return f"{100 * value:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def metrics_table(
    base: dict[str, Any], lofit: dict[str, Any], uncertainty: dict[str, Any] | None = None
) -> str:
    """The results table: each metric for the base model and LoFiT, and the change, each ± one SE.

    Args:
        base: the base model's metrics; lofit: the adapted model's metrics (fractions in [0, 1]).
        uncertainty: `metrics["uncertainty"]` (see `lofit.evaluation.uncertainty.metric_uncertainty`):
            standard errors of each metric ("base", "lofit") and of each change ("change").

    Returns:
        A Markdown table; scores are percentages.

    Example:
        >>> print(metrics_table({"accuracy": 0.5}, {"accuracy": 0.75}))
        | metric | base model | LoFiT | change |
        |---|---:|---:|---:|
        | accuracy | 50.0 | 75.0 | +25.0 |
    """
    errors = uncertainty or {}
    names = [name for name in lofit if isinstance(lofit[name], (int, float))]
    lines = ["| metric | base model | LoFiT | change |", "|---|---:|---:|---:|"]
    for name in names:
        before, after = base.get(name), lofit[name]
        change = ""
        if _is_fraction(before) and _is_fraction(after):
            change_se = errors.get("change", {}).get(name)
            change = f"{100 * (after - before):+.1f}" + (
                f" ± {100 * change_se:.1f}" if change_se is not None else ""
            )
        intervals = errors.get("interval95", {})
        cells = [
            _number(before, errors.get("base", {}).get(name), intervals.get("base", {}).get(name)),
            _number(after, errors.get("lofit", {}).get(name), intervals.get("lofit", {}).get(name)),
        ]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {change} |")
    return "\n".join(lines)


def uncertainty_note(uncertainty: dict[str, Any] | None) -> list[str]:
    """The line under the results table saying what the ± figures are.

    Args:
        uncertainty: `metrics["uncertainty"]`, or None.

    Returns:
        The report lines (none without standard errors).
    """
    if not uncertainty or not uncertainty.get("base"):
        return []
    return [
        f"± is one standard error over the n = {uncertainty['n']} test records (a 95% interval is about "
        f"± 1.96 SE): {uncertainty['method']}. At 0% or 100% the table gives the Wilson 95% interval instead.",
        "",
    ]


def validation_table(validation: dict[str, Any]) -> list[str]:
    """The report lines of the validation loss after each epoch (0 = before training) of both steps.

    Args:
        validation: `metrics["validation"]` ({"select": [[epoch, loss], ...], "train": [...]}).

    Returns:
        The table's lines, or [] without validation data.
    """
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


def logit_lens_section(lens: list[dict[str, Any]] | str, limit: int = 20) -> list[str]:
    """The report's logit-lens table (the paper's App. E) from metrics.json's `logit_lens` entries.

    Args:
        lens: a list of `HeadTokens` fields as dicts (what `lofit run` stores), or a note (str) saying
            why there is none.
        limit: how many heads to show, largest ‖v‖ first.

    Example:
        >>> entry = {"layer": 3, "head": 1, "token_ids": [5], "tokens": [" mother"], "scores": [2.5],
        ...          "offset_norm": 0.8}
        >>> logit_lens_section([entry])[-2].splitlines()[-1]
        '| (3, 1) | 0.800 | `mother` |'
    """
    title = ["## Logit lens of the learned offsets", ""]
    if isinstance(lens, str):
        return [*title, f"({lens})", ""]
    from ..evaluation.logit_lens import HeadTokens, logit_lens_markdown

    rows = [HeadTokens(**entry) for entry in lens]
    return [
        *title,
        "The tokens each head's offset v promotes when read through the logit lens: the top entries of "
        "W_U · norm(W_O[:, head] v) (direction only; heads with the largest ‖v‖ first).",
        "",
        logit_lens_markdown(rows, limit=limit),
        "",
    ]


def training_section(out: Path, metrics: dict[str, Any]) -> list[str]:
    """The report's training settings, validation losses and loss curves."""
    settings = metrics.get("settings", {})
    return [
        "## Training",
        "",
        f"- head selection ({settings.get('select', {}).get('method')}): `{settings.get('select')}`",
        f"- offset training: `{settings.get('train')}`",
        f"- k: {settings.get('k')}",
        f"- lower-layer cache in offset training: `{metrics.get('lower_layer_cache')}`",
        "",
        *validation_table(metrics.get("validation", {})),
        _image(out, "select/loss_curve.png", "head selection loss"),
        _image(out, "train/loss_curve.png", "offset training loss"),
    ]


def render_report(out: Path, metrics: dict[str, Any]) -> str:
    """The text of report.md for the metrics of one `lofit run`.

    Args:
        out: the run's output directory (images are linked when present there).
        metrics: what `lofit.cli.pipeline.run` wrote to metrics.json.

    Returns:
        The Markdown text.
    """
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
        metrics_table(metrics.get("base", {}), metrics.get("lofit", {}), metrics.get("uncertainty")),
        "",
        *uncertainty_note(metrics.get("uncertainty")),
        f"Trainable parameters: **{metrics.get('trainable_params'):,}** (offsets on "
        f"{metrics.get('num_heads_selected')} of {metrics.get('total_heads')} heads).",
        "",
        "## Selected heads",
        "",
        head_list,
        "",
        _image(out, "heads.png", "head scores (selected heads marked)"),
        *training_section(out, metrics),
        *logit_lens_section(metrics["logit_lens"]),
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
    """Write `out/report.md` atomically.

    Args:
        out: the run's output directory.
        metrics: what `lofit.cli.pipeline.run` wrote to metrics.json.

    Returns:
        The report's path.
    """
    path = Path(out) / "report.md"
    atomic_write_text(path, render_report(Path(out), metrics))
    return path
