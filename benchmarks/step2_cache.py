"""A whole step 2 with the frozen lower layers run once (`cache_lower_layers=True`) vs PEFT LoRA.

Every configuration trains 5 epochs of DPO on the same TruthfulQA fold-0 training pairs (the task's own
objective), batch 8, fp32, through lofit's one training loop: LoFiT offsets via the public
`train_offsets(..., cache_lower_layers=...)`, LoRA (r 8, α 8 on q, v; `lofit.baselines.get_lora_model`)
via `train_adapter(AdapterView(peft_model), ...)`. The head sets are the ones the paper-scale run's
`select_heads` picked for TruthfulQA fold 0 (top 3% and 10%, `results/paper_scale/paper_tables.json`) and
the speed benchmark's upper-half set. Each run is a fresh process (so peak RSS is its own); runs are interleaved
(A B C ..., then ... C B A) and timed by process CPU time of the training call (one torch thread: the
machine is shared and CPU time leaves out the time other processes hold the core), wall time beside.

The layer-count bound of each cached run: LoRA runs the DPO reference pass (30 layers forward) and then
per epoch 30 layers forward and 30 backward; a LoFiT run whose lowest adapted layer is L runs 30 forward
in the reference pass, which fills the cache, and then per epoch (30 - L) forward and (30 - L) backward.

    OMP_NUM_THREADS=1 python -m benchmarks.step2_cache --records 128 --rounds 2
    python -m benchmarks.step2_cache --model DIR --configs lora upper_cached --records 4 --epochs 1 \\
        --rounds 1 --max-length 96 --out DIR  # smoke test (the selected sets need the bundled model)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import RESULTS
from .harness.environment import child_env, environment
from .harness.internals import atomic_write_json, atomic_write_text

PAPER = RESULTS / "paper_scale" / "paper_tables.json"
CONFIGS = (
    "lora",
    "lofit3_cached",
    "lofit3",
    "lofit10_cached",
    "lofit10",
    "upper_cached",
    "upper",
)
LABELS = {
    "lora": "PEFT LoRA r8 q,v",
    "lofit3": "LoFiT offsets, selected 3% (8 heads)",
    "lofit10": "LoFiT offsets, selected 10% (27 heads)",
    "upper": "LoFiT offsets, upper half (27 heads)",
}


def head_set(config: str, num_layers: int = 30, num_heads: int = 9) -> dict[int, list[int]]:
    """The heads of a LoFiT configuration (paper-scale selections, or the speed benchmark's upper half).

    Example:
        >>> head_set("upper_cached", num_layers=4, num_heads=4)  # 10% of 16 heads, in layers 2-3
        {2: [0], 3: [0]}
    """
    family = config.removesuffix("_cached")
    if family == "upper":
        from .speed.targets import head_count, standard_head_sets

        return standard_head_sets(num_layers, num_heads, head_count(num_layers, num_heads, 0.1))["upper"]
    unit = {"lofit3": "lofit/truthfulqa/f0/k0.03/lofit", "lofit10": "lofit/truthfulqa/f0/k0.1/lofit"}[family]
    heads = json.loads(PAPER.read_text())["units"][unit]["heads"]
    return {int(layer): [int(h) for h in chosen] for layer, chosen in heads.items()}


def train_one(
    config: str, records: int, epochs: int, model_name: str, max_length: int | None = None
) -> dict[str, Any]:
    """Train one configuration in this process; return its timing, memory and losses."""
    import torch

    import lofit
    from lofit.baselines import get_lora_model, trainable_parameters
    from lofit.tasks import load_task
    from lofit.training import AdapterView, TrainingConfig, make_objective, train_adapter

    torch.manual_seed(0)
    model, tokenizer = lofit.load_model(model_name)
    model.float()
    data = load_task("truthfulqa", fold=0).train[:records]
    rss_after_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    options = dict(epochs=epochs, batch_size=8, lr=1e-2, precision="fp32", progress=False, seed=42)
    if max_length is not None:
        options["max_length"] = max_length
    started_cpu, started_wall = time.process_time(), time.perf_counter()
    if config == "lora":
        peft_model = get_lora_model(model)
        train_config = TrainingConfig(**options)
        objective = make_objective("dpo", tokenizer, train_config.max_length, train_config.beta)
        examples = objective.encode(data)
        view = AdapterView(peft_model, trainable_parameters(peft_model))
        history = train_adapter(view, objective, examples, train_config, description="lora")
        lowest = 0
    else:
        heads = head_set(config, model.config.num_hidden_layers, model.config.num_attention_heads)
        trained = lofit.train_offsets(
            model,
            tokenizer,
            data,
            heads,
            objective="dpo",
            cache_lower_layers=config.endswith("_cached"),
            **options,
        )
        history = trained.training_history
        examples = make_objective("dpo", tokenizer, max_length).encode(data)
        lowest = min(layer for layer, chosen in heads.items() if chosen)
    cpu_s, wall_s = time.process_time() - started_cpu, time.perf_counter() - started_wall
    tokens = sum(len(s.input_ids) for e in examples for s in e.sequences)
    return {
        "config": config,
        "cpu_s": cpu_s,
        "wall_s": wall_s,
        "tokens_per_epoch": tokens,
        "train_tokens_per_s_cpu": tokens * epochs / cpu_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_setup_bytes": rss_after_setup,
        "lowest_layer": lowest,
        "losses": [round(float(s["loss"]), 6) for s in history.steps],
    }


def layer_bound(lowest: int, epochs: int, num_layers: int = 30) -> float:
    """LoRA's layer passes over a cached LoFiT run's (reference pass + epochs x (forward + backward))."""
    lora = num_layers + epochs * 2 * num_layers
    cached = num_layers + epochs * 2 * (num_layers - lowest)
    return lora / cached


def run_worker(config: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in a fresh process (its own peak RSS), return its JSON line."""
    command = [sys.executable, "-m", "benchmarks.step2_cache", "--worker", config, "--model", args.model]
    command += ["--records", str(args.records), "--epochs", str(args.epochs)]
    command += [] if args.max_length is None else ["--max-length", str(args.max_length)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=child_env())
    if done.returncode != 0:
        raise SystemExit(f"{config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict[str, Any]], epochs: int) -> dict[str, dict[str, Any]]:
    """Per configuration: median CPU time, tokens/s, × LoRA (paired by round), peak RSS, the bound."""
    by_config: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_config.setdefault(run["config"], []).append(run)
    lora = {r["round"]: r["cpu_s"] for r in by_config["lora"]}
    table = {}
    for config, rows in by_config.items():
        ratios = [lora[r["round"]] / r["cpu_s"] for r in rows if r["round"] in lora]
        table[config] = {
            "cpu_s": statistics.median(r["cpu_s"] for r in rows),
            "wall_s": statistics.median(r["wall_s"] for r in rows),
            "tokens_per_s": statistics.median(r["train_tokens_per_s_cpu"] for r in rows),
            "x_lora": statistics.median(ratios),
            "x_lora_range": [min(ratios), max(ratios)],
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rows),
            "lowest_layer": rows[0]["lowest_layer"],
            "bound": layer_bound(rows[0]["lowest_layer"], epochs) if config != "lora" else 1.0,
            "losses_last": rows[0]["losses"][-1],
        }
    return table


def same_losses(runs: list[dict[str, Any]], config: str) -> float | None:
    """Largest |loss difference| between a cached run and its uncached twin (same round)."""
    cached = {r["round"]: r["losses"] for r in runs if r["config"] == config + "_cached"}
    plain = {r["round"]: r["losses"] for r in runs if r["config"] == config}
    common = sorted(set(cached) & set(plain))
    if not common:
        return None
    return max(abs(a - b) for r in common for a, b in zip(cached[r], plain[r], strict=True))


def render(report: dict[str, Any]) -> str:
    """The markdown table of the results."""
    table, info = report["summary"], report["info"]
    lines = [
        "# Step 2 with the frozen lower layers run once vs PEFT LoRA",
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}; machine: {info['machine']}; versions: "
        + (info.get("versions") or f"torch {info['torch']}, transformers {info['transformers']}"),
        f"- {info['records']} TruthfulQA fold-0 training pairs (DPO, batch 8, {info['epochs']} epochs, fp32), "
        f"{info['tokens_per_epoch']:,} tokens per epoch; {info['rounds']} interleaved rounds, one fresh "
        "process per run; × LoRA is the median of the per-round ratios of process CPU time (range in brackets).",
        "",
        "| configuration | lowest adapted layer | CPU s (median) | train tokens/s | × LoRA | layer bound | "
        "of the bound | peak RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for config in CONFIGS:
        if config not in table:
            continue
        row = table[config]
        label = LABELS[config.removesuffix("_cached")] + (
            ", cached lower layers" if "_cached" in config else ""
        )
        low, high = row["x_lora_range"]
        bound = f"{row['bound']:.2f}×" if "_cached" in config else "–"
        share = f"{row['x_lora'] / row['bound']:.0%}" if "_cached" in config else "–"
        lines.append(
            f"| {label} | {row['lowest_layer'] if config != 'lora' else '–'} | {row['cpu_s']:.0f} | "
            f"{row['tokens_per_s']:,.0f} | {row['x_lora']:.2f}× ({low:.2f}–{high:.2f}) | {bound} | {share} | "
            f"{row['peak_rss_bytes'] / 2**20:,.0f} MiB |"
        )
    lines += ["", "Cached vs uncached losses (every step, same round): "]
    for family in ("lofit3", "lofit10", "upper"):
        diff = same_losses(report["runs"], family)
        if diff is not None:
            lines.append(f"- {LABELS[family]}: max |Δ loss| = {diff:.1e}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="bundled name or local directory")
    parser.add_argument("--max-length", type=int, default=None, help="truncate sequences (prompt first)")
    parser.add_argument("--records", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--worker", choices=CONFIGS)
    parser.add_argument("--out", type=Path, default=RESULTS / "step2_cache")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(train_one(args.worker, args.records, args.epochs, args.model, args.max_length)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": "OMP_NUM_THREADS=1 python -m benchmarks.step2_cache "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "info": {
            **environment(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "records": args.records,
            "epochs": args.epochs,
            "rounds": args.rounds,
        },
        "runs": [],
    }
    for round_ in range(args.rounds):
        order = args.configs if round_ % 2 == 0 else list(reversed(args.configs))
        for config in order:
            run = run_worker(config, args) | {"round": round_, "load_average": os.getloadavg()}
            report["runs"].append(run)
            print(
                f"round {round_} {config}: {run['cpu_s']:.1f} s CPU, {run['wall_s']:.1f} s wall", flush=True
            )
            report["info"]["tokens_per_epoch"] = run["tokens_per_epoch"]
            if any(r["config"] == "lora" for r in report["runs"]):
                report["summary"] = summarise(report["runs"], args.epochs)
                atomic_write_text(args.out / "step2_cache.md", render(report))
            atomic_write_json(args.out / "step2_cache.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
