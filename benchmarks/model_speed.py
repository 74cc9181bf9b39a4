"""Training speed of two models side by side: Gemma 3 270M vs the bundled SmolLM2-135M.

Both models run the same small workload in one process, alternating (A B, A B, ...): step 1
(`lofit.select_heads`, the L1 selection) and step 2 (`lofit.train_offsets` on the task's top-k heads),
each on the first `--records` TruthfulQA fold-0 DPO pairs, 1 epoch, batch 8, `lofit run`'s precision
(auto: bf16 autocast where the CPU has bf16 instructions). The speed is the training loop's own count:
real (unpadded) tokens of the optimizer steps divided by their seconds (`training_history.steps`: tokens,
step_s), so loading, encoding and the one-off checks are left out; the first step of each call (warm-up,
the scorer's one-time check) is reported apart.

    python -m benchmarks.model_speed                       # 32 pairs, 2 rounds, results/model_speed.*
    python -m benchmarks.model_speed --models DIR DIR --records 4 --rounds 1 --out DIR   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from . import RESULTS
from .harness.environment import environment
from .harness.internals import atomic_write_json, atomic_write_text

MODELS = ("smollm2-135m", "gemma3-270m")
STEPS = ("select", "train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs=2, default=list(MODELS), help="two model names or paths")
    parser.add_argument("--records", type=int, default=32, help="TruthfulQA fold-0 DPO pairs")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--precision", default="auto", help="as `lofit run --precision` (auto: bf16 where fast)"
    )
    parser.add_argument("--max-length", type=int, default=None, help="truncate prompts (default: none)")
    parser.add_argument("--data-dir", default=None, help="benchmark data (default: LOFIT_DATA_DIR)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for model_speed.{md,json}")
    return parser.parse_args(argv)


def run_steps(
    model: Any, tokenizer: Any, records: list[dict[str, Any]], k: float, args: argparse.Namespace
) -> dict[str, Any]:
    """Step 1 then step 2 on `records`; each step's per-optimizer-step (tokens, seconds) and wall time."""
    import lofit

    settings = {"objective": "dpo", "epochs": 1, "batch_size": args.batch_size, "progress": False}
    settings.update(precision=args.precision, max_length=args.max_length)
    started = time.perf_counter()
    selection = lofit.select_heads(model, tokenizer, records, **settings)
    select_wall = time.perf_counter() - started
    started = time.perf_counter()
    adapted = lofit.train_offsets(model, tokenizer, records, selection.top(k), **settings)
    train_wall = time.perf_counter() - started
    adapted.unload()
    result = {}
    for step, history, wall in (
        ("select", (selection.history or {}).get("steps", []), select_wall),
        ("train", adapted.training_history.steps, train_wall),
    ):
        steps = [(int(s["tokens"]), float(s["step_s"])) for s in history]
        result[step] = {"steps": steps, "wall_s": wall}
    return result


def tokens_per_s(steps: list[tuple[int, float]]) -> float:
    """Tokens over seconds of a list of (tokens, seconds) optimizer steps.

    Example:
        >>> tokens_per_s([(100, 1.0), (300, 1.0)])
        200.0
    """
    return sum(t for t, _ in steps) / max(sum(s for _, s in steps), 1e-9)


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per model and step: tokens/s of all steps after each call's first, the first steps apart, and walls."""
    summary: dict[str, Any] = {}
    for name, rounds in runs.items():
        summary[name] = {}
        for step in STEPS:
            later = [s for r in rounds for s in r[step]["steps"][1:]]
            first = [r[step]["steps"][0] for r in rounds]
            summary[name][step] = {
                "tokens_per_s": tokens_per_s(later or first),
                "first_step_tokens_per_s": tokens_per_s(first),
                "tokens": sum(t for t, _ in later),
                "wall_s_median": statistics.median(r[step]["wall_s"] for r in rounds),
            }
    return summary


def ratios(summary: dict[str, Any], models: list[str]) -> dict[str, float]:
    """Second model's tokens/s over the first's, per step."""
    first, second = models
    return {
        step: summary[second][step]["tokens_per_s"] / summary[first][step]["tokens_per_s"] for step in STEPS
    }


def markdown(result: dict[str, Any]) -> str:
    models, summary = result["models"], result["summary"]
    lines = [
        "# Training speed: " + " vs ".join(models),
        "",
        f"`{result['command']}`; {result['records']} TruthfulQA fold-0 DPO pairs, 1 epoch, batch "
        f"{result['batch_size']}, precision {result['precision']}, {result['rounds']} alternating rounds per model, one process.",
        f"Machine: {result['environment']['machine']}, {result['environment']['cpu_threads']} torch threads, "
        f"load at start {result['environment']['load_average_at_start']}; torch {result['environment']['torch']}, "
        f"transformers {result['environment']['transformers']}.",
        "",
        "| model | step | tokens/s (steps after the first) | first step tokens/s | median wall s of the call |",
        "|---|---|---|---|---|",
    ]
    for name in models:
        for step in STEPS:
            s = summary[name][step]
            lines.append(
                f"| {name} | {step} | {s['tokens_per_s']:.0f} | {s['first_step_tokens_per_s']:.0f} | "
                f"{s['wall_s_median']:.1f} |"
            )
    lines += ["", f"{models[1]} / {models[0]} tokens/s: "]
    lines[-1] += ", ".join(f"{step} {ratio:.2f}x" for step, ratio in result["ratios"].items())
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import lofit
    from lofit.tasks import load_task

    task = load_task("truthfulqa", data_dir=args.data_dir, fold=0)
    records, k = list(task.train[: args.records]), float(task.defaults["k"])
    loaded = {name: lofit.load_model(name) for name in args.models}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.models}
    for _ in range(args.rounds):
        for name in args.models:
            model, tokenizer = loaded[name]
            runs[name].append(run_steps(model, tokenizer, records, k, args))
    summary = summarise(runs)
    result = {
        "command": "python -m benchmarks.model_speed " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "models": list(args.models),
        "records": len(records),
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "environment": environment(),
        "summary": summary,
        "ratios": ratios(summary, list(args.models)),
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "model_speed.json", result)
    atomic_write_text(args.out / "model_speed.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
