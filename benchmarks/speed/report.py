"""benchmarks/results/speed_<target>.json and speed.md (one section per target measured so far)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..harness.internals import atomic_write_json, atomic_write_text
from .timing import paired_ratio

TARGET_ORDER = ("cpu", "gpu", "tiny")
NOISE_FLOOR = 0.02  # "within noise" band for inference ratios: max(this, the A/A control's deviation)


def other_clock(row: dict[str, Any]) -> str:
    return "wall" if row["clock"] == "cpu" else "cpu"


def mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:,.0f} MiB"


def ratio_text(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def write_results(report: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    name = report["target"]["name"]
    json_path = out_dir / f"speed_{name}.json"
    atomic_write_json(json_path, report)
    return [json_path, render_results(out_dir)]


def render_results(out_dir: Path) -> Path:
    """Rewrite out_dir/speed.md from every speed_<target>.json there."""
    reports = {}
    for target in TARGET_ORDER:
        path = out_dir / f"speed_{target}.json"
        if path.exists():
            reports[target] = json.loads(path.read_text())
    md_path = out_dir / "speed.md"
    atomic_write_text(md_path, render(reports) + companion_sections(out_dir))
    return md_path


# Results of the other speed benchmarks, shown in speed.md under their own headings (file, heading).
COMPANIONS = (
    (
        "step2_cache/step2_cache.md",
        "Whole step 2 with the frozen lower layers run once (`python -m benchmarks.step2_cache`)",
    ),
    ("mixed_batch.md", "Mixed-adapter batches (`python -m benchmarks.mixed_batch`)"),
    ("mixed_batch_generate_rerun.md", "Mixed-adapter batches, generation rerun"),
    (
        "mixed_batch_generate_after_cache.md",
        "Mixed-adapter batches, generation after one dense-vector build per `generate` call",
    ),
)


def companion_sections(out_dir: Path) -> str:
    """The companion benchmarks' markdown found in out_dir, each under a level-2 heading."""
    parts = []
    for relative, heading in COMPANIONS:
        path = out_dir / relative
        if not path.exists():
            continue
        body = [line for line in path.read_text().splitlines() if not line.startswith("# ")]
        parts += [
            "",
            f"## {heading}",
            "",
            *[("#" + line if line.startswith("##") else line) for line in body],
        ]
    return "\n".join(parts) + "\n" if parts else ""


# ------------------------------------------------------------------------------------ checks
def checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The speed targets, each with its measured value and whether it is met."""
    main = report["main"]
    lora = main.get("lora")
    rows: list[dict[str, Any]] = []

    def speed(name: str) -> float | None:
        return paired_ratio(main[name], lora) if lora and name in main else None

    def memory(name: str) -> float | None:
        if not lora or name not in main or not main[name]["peak_bytes"] or not lora["peak_bytes"]:
            return None
        return main[name]["peak_bytes"] / lora["peak_bytes"]

    upper_speed, upper_memory = speed("lofit_offsets_upper"), memory("lofit_offsets_upper")
    rows.append(
        {
            "criterion": "offsets, heads in the upper half: tokens/s vs LoRA ≥ 1.5×, peak memory ≤ 0.8×",
            "measured": f"{ratio_text(upper_speed)} speed, {ratio_text(upper_memory)} memory",
            "met": upper_speed is not None
            and upper_speed >= 1.5
            and (upper_memory is None or upper_memory <= 0.8),
        }
    )
    spread = speed("lofit_offsets_spread")
    rows.append(
        {
            "criterion": "offsets, heads spread down to layer 0: tokens/s vs LoRA ≥ 1.1×",
            "measured": f"{ratio_text(spread)} speed, {ratio_text(memory('lofit_offsets_spread'))} memory",
            "met": spread is not None and spread >= 1.1,
        }
    )
    if "lofit_offsets_selected" in main:
        rows.append(
            {
                "criterion": "offsets on the heads select_heads picks for TruthfulQA (reported)",
                "measured": f"{ratio_text(speed('lofit_offsets_selected'))} speed, "
                f"{ratio_text(memory('lofit_offsets_selected'))} memory",
                "met": None,
            }
        )
    step1 = speed("lofit_step1")
    rows.append(
        {
            "criterion": "step 1 (scales on all heads): tokens/s vs LoRA ≥ 1.0×",
            "measured": f"{ratio_text(step1)} speed, {ratio_text(memory('lofit_step1'))} memory",
            "met": step1 is not None and step1 >= 1.0,
        }
    )
    inference = report.get("inference")
    if inference:
        for workload in inference["workloads"]:
            vs = workload["speed_vs_base"]
            noise = max(NOISE_FLOOR, abs(vs["base_again"] - 1))
            rows.append(
                {
                    "criterion": f"{workload['workload']}: merged at base speed (within noise)",
                    "measured": f"{vs['merged']:.3f}× base speed (A/A control {vs['base_again']:.3f}×, band "
                    f"±{noise:.3f})",
                    "met": vs["merged"] >= 1 - noise,
                }
            )
            rows.append(
                {
                    "criterion": f"{workload['workload']}: unmerged overhead ≤ 3%",
                    "measured": f"{100 * (1 / vs['unmerged'] - 1):+.1f}% time vs base",
                    "met": 1 / vs["unmerged"] - 1 <= 0.03,
                }
            )
    evaluation = report.get("eval")
    if evaluation and "speedup" in evaluation:
        rows.append(
            {
                "criterion": "TruthfulQA MC evaluation: fast scorer ≥ 3× the naive per-option scorer",
                "measured": f"{evaluation['speedup']:.2f}× on {evaluation['questions']} questions",
                "met": evaluation["speedup"] >= 3,
            }
        )
    return rows


# ------------------------------------------------------------------------------------ render
def render(reports: dict[str, dict[str, Any]]) -> str:
    lines = [
        "# Speed and memory: LoFiT vs PEFT LoRA vs full fine-tuning",
        "",
        "Written by `python -m benchmarks.speed` (one section per target; rerun a target to refresh its section).",
        "Every method runs the same step on the same batches: the SFT loss through one `TokenScorer`",
        "(LM head at scored positions only), the target's autocast, backward, clip 1.0, AdamW, through",
        "lofit's own `optimizer_step` (runs before 2026-12-06 used a copy of it with the same operations);",
        "the model is in eval mode as in the trainer (LoRA dropout off;",
        "'LoRA, dropout' is peft's train-mode LoRA for reference). Methods are timed interleaved (A B C, then",
        "C B A, ...) after untimed warm-up steps; tokens/s is the median over all timed steps (range in",
        "brackets). Ratios are to PEFT LoRA r8 q,v measured in the same run.",
        "",
    ]
    for name, report in reports.items():
        lines += render_target(name, report)
    return "\n".join(lines) + "\n"


def render_target(name: str, report: dict[str, Any]) -> list[str]:
    target, machine, info = report["target"], report["machine"], report["info"]
    lines = [
        f"## Target `{name}`: {target['model']} on {target['device']}",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}; total run time {report.get('elapsed_s', 0):.0f} s",
        f"- machine: {machine.get('gpu') or machine['cpu']} (CPU: {machine['cpu']}, {machine.get('cpu_count')} "
        f"logical CPUs, torch threads {machine['cpu_threads']}; load average at start "
        f"{machine.get('load_average_at_start')}, at end {machine.get('load_average_at_end')}); {machine['platform']}",
        f"- versions: python {machine['python']}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}, peft {machine['peft']}"
        + (f", CUDA {machine['cuda']}" if "cuda" in machine else ""),
        f"- model weights {target['weight_dtype']}, autocast {target['autocast']}; batch {target['batch_size']} × "
        f"{target['seq_len']} tokens ({info.get('tokens_per_batch')} real tokens), "
        f"{100 * info.get('scored_fraction', 0):.1f}% of the tokens scored",
        f"- rounds × steps: {report['settings']['rounds']} × {report['settings']['steps']} timed steps per "
        f"method after {report['settings']['warmup']} warm-up step(s); primary clock: "
        f"{report['settings'].get('clock', 'wall')}"
        + (
            " (process CPU time of the single-threaded benchmark: the machine is shared, and CPU time "
            "leaves out the time other processes hold the core; wall-clock numbers are shown beside)"
            if report["settings"].get("clock") == "cpu"
            else ""
        ),
        f"- K = {info.get('k')} of {info.get('total_heads')} heads per offset set; selected heads: "
        f"{info.get('selected_heads_source')}",
    ]
    if "dpo_random_epoch_padding_fraction" in info:
        lines.append(
            f"- TruthfulQA DPO training set ({info['dpo_pairs']} pairs, batch {target['batch_size']}): padding "
            f"over a whole epoch {100 * info['dpo_random_epoch_padding_fraction']:.0f}% with random batches, "
            f"{100 * info['dpo_grouped_epoch_padding_fraction']:.0f}% length-grouped"
        )
    for set_name, described in info.get("head_sets", {}).items():
        lines.append(
            f"  - {set_name}: {described['count']} heads in {described['layers']} layers, layers "
            f"{described['lowest_layer']}–{described['highest_layer']}"
        )
    lines += ["", "### Training step and forward", ""]
    lines += main_table(report)
    lines += ["", "### Targets", "", "| criterion | measured | met |", "| --- | --- | --- |"]
    for row in checks(report):
        met = "reported" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {row['criterion']} | {row['measured']} | {met} |")
    if report.get("ablations"):
        lines += ["", "### Optimisations, each on its own", ""]
        lines += ablation_tables(report)
    if report.get("inference"):
        lines += ["", "### Inference", ""]
        lines += inference_table(report)
    if report.get("eval"):
        lines += ["", "### TruthfulQA MC evaluation", ""]
        lines += eval_lines(report["eval"])
    for key, value in info.items():
        if key.endswith("_error"):
            lines.append(f"- {key}: {value}")
    lines += ["", "### Closing note: each optimisation and its measured effect", ""]
    lines += closing_note(report)
    lines.append("")
    return lines


def closing_note(report: dict[str, Any]) -> list[str]:
    """One line per optimisation with its effect in this run (speed-up on the primary clock, memory)."""
    lines = []
    for view in report.get("optimisations", []):
        rows = report["ablations"][view["timed_in"]]
        effects = []
        for with_name, without_name in view["pairs"]:
            on, off = rows[with_name], rows[without_name]
            effect = f"{paired_ratio(on, off):.2f}× tokens/s"
            if on.get("peak_bytes") and off.get("peak_bytes"):
                effect += f", peak memory {mib(off['peak_bytes'])} → {mib(on['peak_bytes'])}"
            if on["padding_fraction"] or off["padding_fraction"]:
                effect += (
                    f", padding {100 * off['padding_fraction']:.0f}% → {100 * on['padding_fraction']:.0f}%"
                )
            effects.append(f"{effect} ({on['label']} vs {off['label']})")
        lines.append(f"- **{view['title']}**: " + "; ".join(effects) + ".")
    inference = report.get("inference")
    if inference:
        parts, hooked = [], []
        for workload in inference["workloads"]:
            vs = workload["speed_vs_base"]
            parts.append(
                f"{workload['workload']}: unmerged {100 * (1 / vs['unmerged'] - 1):+.1f}% time, merged "
                f"{vs['merged']:.3f}× base speed (A/A {vs['base_again']:.3f}×)"
            )
            if "base_no_hook" in vs:
                hooked.append(
                    f"{workload['workload']}: base without it {vs['base_no_hook']:.2f}×, with requires_grad=True "
                    f"weights {vs.get('base_trainable', float('nan')):.2f}× the hooked base's speed"
                )
        lines.append(
            "- **Merged inference; cached dense vectors when unmerged** (offsets folded into the output "
            "projection's bias; unmerged, each layer's dense vector is built once per change of the "
            "vectors instead of every call): " + "; ".join(parts) + "."
        )
        if hooked:
            lines.append(
                "- **Contiguous LM-head input** (`lofit.adapters.lm_head`: on CPU a frozen linear layer runs a "
                "non-contiguous input ~2× slower, and transformers' prefill slices `hidden[:, -1:]`): "
                + "; ".join(hooked)
                + "."
            )
    evaluation = report.get("eval")
    if evaluation and "speedup" in evaluation:
        lines.append(
            f"- **TruthfulQA MC fast scorer** (shared prefixes through the KV cache): {evaluation['speedup']:.2f}× "
            f"the naive per-option scorer on {evaluation['questions']} questions."
        )
    return lines


def main_table(report: dict[str, Any]) -> list[str]:
    main = report["main"]
    lora = main.get("lora")
    first = next(iter(main.values()))
    clock, second = first["clock"], other_clock(first)
    cpu = report["target"]["device"] == "cpu"
    memory_header = "peak RSS" if cpu else "peak allocated"
    lines = [
        f"| method | tokens/s, {clock} clock (range) | × LoRA | tokens/s, {second} clock | × LoRA | "
        f"{memory_header} | × LoRA | " + ("peak − RSS after setup |" if cpu else "peak − allocated before |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in main.values():
        memory = (
            row["peak_bytes"] / lora["peak_bytes"]
            if lora and row.get("peak_bytes") and lora.get("peak_bytes")
            else None
        )
        increment = (
            row["peak_bytes"] - row["base_bytes"] if row.get("peak_bytes") and row.get("base_bytes") else None
        )
        lines.append(
            f"| {row['label']} | {row['tokens_per_s']:,.0f} ({row['tokens_per_s_min']:,.0f}–"
            f"{row['tokens_per_s_max']:,.0f}) | {ratio_text(paired_ratio(row, lora) if lora else None)} | "
            f"{row[f'tokens_per_s_{second}']:,.0f} | "
            f"{ratio_text(paired_ratio(row, lora, second) if lora else None)} | {mib(row.get('peak_bytes'))} | "
            f"{ratio_text(memory)} | {mib(increment)} |"
        )
    lines += [
        "",
        "× LoRA: median over rounds of (this method's tokens/s / LoRA's in the same round).",
    ]
    how = next((r["memory_how"] for r in main.values() if r.get("memory_how")), "")
    if how:
        lines.append(f"Memory: {how}.")
    return lines


def ablation_tables(report: dict[str, Any]) -> list[str]:
    """One table per optimisation: each (with it, without it) pair, timed interleaved in one set."""
    lines: list[str] = []
    for view in report.get("optimisations", []):
        rows = report["ablations"][view["timed_in"]]
        first = next(iter(rows.values()))
        lines += [f"**{view['title']}** — {view['note']}.", ""]
        lines += [
            f"| with | tokens/s ({first['clock']}) | without | tokens/s | speed-up ({first['clock']} / "
            f"{other_clock(first)} clock) | memory with / without | padding with / without |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for with_name, without_name in view["pairs"]:
            on, off = rows[with_name], rows[without_name]
            lines.append(
                f"| {on['label']} | {on['tokens_per_s']:,.0f} | {off['label']} | {off['tokens_per_s']:,.0f} | "
                f"**{paired_ratio(on, off):.2f}×** / {paired_ratio(on, off, other_clock(on)):.2f}× | "
                f"{mib(on.get('peak_bytes'))} / {mib(off.get('peak_bytes'))} | "
                f"{100 * on['padding_fraction']:.0f}% / {100 * off['padding_fraction']:.0f}% |"
            )
        lines.append("")
    return lines


INFERENCE_LABELS = {
    "base": "base model (weights frozen, LM-head pre-hook as every LoFiT model)",
    "unmerged": "LofitModel, adapter unmerged",
    "merged": "merge_and_unload() (bias on the adapted o_proj only)",
    "base_no_hook": "base, frozen, without the LM-head pre-hook",
    "base_again": "base again (A/A control: noise)",
    "base_trainable": "base with requires_grad=True weights, no pre-hook (as from_pretrained gives it)",
}


def inference_table(report: dict[str, Any]) -> list[str]:
    inference = report["inference"]
    checks = inference["checks"]
    workloads = inference["workloads"]
    clock = workloads[0].get("clock", "wall")
    lines = [
        f"Adapter: offsets `{inference['adapter']}`, weights {inference['dtype']}; {clock} clock. Logit checks: "
        f"merged vs unmerged max |Δ| {checks['merged_vs_unmerged_max_abs_logit_diff']:.3g} (mean "
        f"{checks.get('merged_vs_unmerged_mean_abs_logit_diff', float('nan')):.3g}), adapter vs base max |Δ| "
        f"{checks['adapter_vs_base_max_abs_logit_diff']:.3g} (mean "
        f"{checks.get('adapter_vs_base_mean_abs_logit_diff', float('nan')):.3g}).",
        "",
        "| variant | "
        + " | ".join(f"{w['workload']} ({w['tokens_per_call']} tok/call) tok/s | × base" for w in workloads)
        + " |",
        "| --- |" + " --- | --- |" * len(workloads),
    ]
    for variant in workloads[0]["tokens_per_s"]:
        cells = []
        for w in workloads:
            ratio = 1.0 if variant == "base" else w["speed_vs_base"][variant]
            cells.append(f"{w['tokens_per_s'][variant]:,.1f} | {ratio:.3f}×")
        lines.append(f"| {INFERENCE_LABELS.get(variant, variant)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "× base: median over repetitions of base time / variant time within the same repetition (each "
        "repetition runs the variants in a rotated order, so each runs in each position equally often).",
    ]
    return lines


def eval_lines(evaluation: dict[str, Any]) -> list[str]:
    if "speedup" not in evaluation:
        return [f"Not measured: {evaluation.get('skipped')}"]
    seconds = evaluation["seconds"]
    return [
        f"{evaluation['questions']} fold-0 test questions: fast scorer {min(seconds['fast']):.1f} s, naive "
        f"per-option scorer {min(seconds['naive']):.1f} s (best of {len(seconds['fast'])}): "
        f"**{evaluation['speedup']:.2f}×**; largest metric difference {evaluation['max_metric_diff']:.2g}.",
    ]
