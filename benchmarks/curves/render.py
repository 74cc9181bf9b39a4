"""Tables and plots of `benchmarks.curves` (Fig. 4 data efficiency, Fig. 5 number of heads) from its unit files."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..harness.internals import atomic_write_with
from ..harness.stats import mean_se

TITLES = {"truthfulqa": "TruthfulQA", "mquake": "MQuAKE", "clutrr": "CLUTRR", "svamp": "SVAMP"}
METHOD_TITLES = {
    "lofit": "LoFiT 10%",
    "lora": "LoRA r8 q,v",
    "red": "RED",
    "repe": "RepE",
    "iti": "ITI",
    "loreft": "LoReFT",
    "zero_shot": "0-shot (base model)",
}
FIG4 = re.compile(
    r"fig4/(?P<task>\w+)/n(?P<n>\d+)/s(?P<seed>\d+)/(?P<method>lofit|lora|red|repe|iti|loreft|zero_shot)$"
)
# Fig. 5 on the whole split, or (`n<n>/`) on a training subset of n records: its "method" slot is "n<n>".
FIG5 = re.compile(r"fig5/(?P<task>\w+)/(?:(?P<method>n\d+)/)?k(?P<k>[\d.e-]+)/s(?P<seed>\d+)$")


def metric_of(task: str) -> str:
    return "mc1" if task == "truthfulqa" else "exact_match"


def cell(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean, se = mean_se([100 * v for v in values])
    return f"{mean:.1f}" + ("" if math.isnan(se) else f" ± {se:.1f}") + f" ({len(values)})"


def collect(
    units: dict[str, Any], pattern: re.Pattern[str], key: str
) -> dict[tuple[str, str, Any], list[float]]:
    """{(task, method or '', n or k): [test metric per seed]} for the units that match `pattern`."""
    out: dict[tuple[str, str, Any], list[float]] = {}
    for unit, result in sorted(units.items()):
        match = pattern.match(unit)
        if not match or "test" not in result:
            continue
        task = match["task"]
        where = (
            task,
            match.groupdict().get("method") or "",
            float(match[key]) if key == "k" else int(match[key]),
        )
        out.setdefault(where, []).append(float(result["test"][metric_of(task)]))
    return out


def fig4_table(points: dict[tuple[str, str, Any], list[float]], task: str) -> list[str]:
    sizes = sorted({n for t, _, n in points if t == task})
    if not sizes:
        return []
    methods = [m for m in METHOD_TITLES if any(t == task and mm == m for t, mm, _ in points)]
    head = ["n", *[METHOD_TITLES[m] for m in methods], "LoFiT − LoRA (paired by seed)"]
    lines = [f"### {TITLES[task]} ({metric_of(task)}, %, mean ± SE over seeds (number of seeds))", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in sizes:
        cells = [cell(points.get((task, m, n), [])) for m in methods]
        lofit, lora = points.get((task, "lofit", n), []), points.get((task, "lora", n), [])
        pairs = min(len(lofit), len(lora))
        diff = cell([a - b for a, b in zip(lofit[:pairs], lora[:pairs], strict=True)]) if pairs else "–"
        lines.append("| " + " | ".join([str(n), *cells, diff]) + " |")
    return [*lines, ""]


def fig5_table(points: dict[tuple[str, str, Any], list[float]], tasks: Sequence[str]) -> list[str]:
    """One column per task and training size: the whole split, or n records (`n<n>` in the method slot).

    Example:
        >>> pts = {("mquake", "", 0.1): [0.44], ("clutrr", "n64", 0.1): [0.35, 0.37]}
        >>> for line in fig5_table(pts, ["mquake", "clutrr"])[2:5]:
        ...     print(line)
        | K (% of heads) | MQuAKE exact_match | CLUTRR exact_match (n = 64) |
        |---|---|---|
        | 10 | 44.0 (1) | 36.0 ± 1.0 (2) |
    """
    fractions = sorted({k for _, _, k in points})
    if not fractions:
        return []
    columns = [(t, at) for t in tasks for at in sorted({a for tt, a, _ in points if tt == t}, key=len)]
    head = [
        "K (% of heads)",
        *[f"{TITLES[t]} {metric_of(t)}" + (f" (n = {at[1:]})" if at else "") for t, at in columns],
    ]
    lines = [
        "## Fig. 5: LoFiT accuracy vs the number of heads (whole training split unless n is given; test %)",
        "",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in fractions:
        cells = [cell(points.get((t, at, k), [])) for t, at in columns]
        lines.append("| " + " | ".join([f"{100 * k:g}", *cells]) + " |")
    return [*lines, ""]


def whole_split_table(
    points: dict[tuple[str, str, Any], list[float]],
    train_sizes: dict[str, int],
    heads: dict[tuple[str, str, Any], list[float]] | None = None,
) -> list[str]:
    """Tables 1 and 3 on this harness: every method trained on the task's whole training split.

    Example:
        >>> pts = {("mquake", "lofit", 134): [0.4, 0.5], ("mquake", "lofit", 64): [0.1]}
        >>> whole_split_table(pts, {"mquake": 134})[4]
        '| LoFiT 10% | 45.0 ± 5.0 (2) |'
    """
    tasks = [
        t for t in TITLES if t in train_sizes and any((t, m, train_sizes[t]) in points for m in METHOD_TITLES)
    ]
    if not tasks:
        return []
    head = ["method", *[f"{TITLES[t]} {metric_of(t)} (n = {train_sizes[t]})" for t in tasks]]
    lines = ["## Tables 1 and 3 on this harness: the whole training split (test %)", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [
        (title, [points.get((t, method, train_sizes[t]), []) for t in tasks])
        for method, title in METHOD_TITLES.items()
    ]
    if heads:  # Fig. 5 runs on the whole split too: its K = 3% point is Table 1's "LoFiT 3%"
        rows.insert(1, ("LoFiT 3% (Fig. 5)", [heads.get((t, "", 0.03), []) for t in tasks]))
    for title, values in rows:
        if any(values):
            lines.append("| " + " | ".join([title, *[cell(v) for v in values]]) + " |")
    lines += [
        "",
        "Mean ± SE over seeds (number of seeds). At the whole split the seeds share the training set and differ "
        "only in its order and the initialisation; RepE is deterministic given the set, so it runs once. With "
        "one value the sampling error of an accuracy p on the test subset of m records is √(p(1−p)/m): about "
        "5 points at p = 0.5, m = 100.",
        "",
    ]
    return lines


def plot(points: dict[tuple[str, str, Any], list[float]], path: Path, fig5: bool) -> bool:
    """One panel per task: mean ± SE per method (Fig. 4) or per K (Fig. 5). False when nothing to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    tasks = [t for t in TITLES if any(p[0] == t for p in points)]
    if not tasks:
        return False
    figure = Figure(figsize=(4.2 * len(tasks), 3.4))
    FigureCanvasAgg(figure)
    for i, task in enumerate(tasks):
        axes = figure.add_subplot(1, len(tasks), i + 1)
        curves = sorted({m for t, m, _ in points if t == task}, key=len) if fig5 else list(METHOD_TITLES)
        for method in curves:
            xs = sorted(x for t, m, x in points if t == task and m == method)
            if not xs:
                continue
            stats = [mean_se([100 * v for v in points[(task, method, x)]]) for x in xs]
            xs_plot = [100 * x for x in xs] if fig5 else xs
            errors = [0.0 if math.isnan(se) else se for _, se in stats]
            if fig5:
                label = "LoFiT" + (f", n = {method[1:]}" if method else ", whole split")
            else:
                label = METHOD_TITLES[method]
            axes.errorbar(xs_plot, [m for m, _ in stats], yerr=errors, marker="o", capsize=3, label=label)
        axes.set_xscale("log")
        ticks = sorted({100 * x if fig5 else x for t, _, x in points if t == task})
        axes.set_xticks(ticks, [f"{x:g}" for x in ticks])  # the measured n / K, not 2×10¹-style labels
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.set_xlabel("% of heads (K)" if fig5 else "training examples (n)")
        axes.set_ylabel(f"test {metric_of(task)} (%)")
        axes.set_title(TITLES[task])
        axes.legend(fontsize=8)
    atomic_write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    return True


def render_curves(
    units: dict[str, Any], settings: dict[str, Any], out: Path, train_sizes: dict[str, int] | None = None
) -> str:
    """The markdown of both curves (and their PNGs in `out`), from whatever units have finished.

    `train_sizes` ({task: size of its whole training split}) adds the whole-split table (Tables 1 and 3).
    """
    fig4 = collect(units, FIG4, "n")
    fig5 = collect(units, FIG5, "k")
    lines = ["# LoFiT curves: data efficiency (Fig. 4) and number of heads (Fig. 5)", ""]
    lines += [
        f"Settings: model {settings['model']}, {settings['epochs']} epochs, batch {settings['batch_size']}, "
        f"{settings['precision']}; test: a seeded subset of {settings['max_test'] or 'all'} records per task "
        f"(the same for every unit); learning rate per unit from LoFiT {settings['lofit_lrs']}, LoRA "
        f"{settings['lora_lrs']}, RED {settings['red_lrs']} by the final validation loss on "
        f"{settings['max_val'] or 'all'} validation records. Finished units: {len(units)}.",
        "",
        "## Fig. 4: test accuracy vs training examples",
        "",
    ]
    for task in TITLES:
        lines += fig4_table(fig4, task)
    if plot(fig4, out / "fig4.png", fig5=False):
        lines += ["![Fig. 4](fig4.png)", ""]
    lines += whole_split_table(fig4, train_sizes or {}, fig5)
    lines += fig5_table(fig5, [t for t in TITLES if any(p[0] == t for p in fig5)])
    if plot(fig5, out / "fig5.png", fig5=True):
        lines += ["![Fig. 5](fig5.png)", ""]
    notes = out / "curves_notes.md"
    if notes.is_file():
        lines += [notes.read_text(encoding="utf-8").rstrip(), ""]
    return "\n".join(lines)
