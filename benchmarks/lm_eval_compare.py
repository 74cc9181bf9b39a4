"""lofit's multiple-choice scorer against lm-evaluation-harness's, on the same model and the same requests.

    PYTHONPATH=src python -m benchmarks.lm_eval_compare --records 50 --repeats 2
    PYTHONPATH=src python -m benchmarks.lm_eval_compare --model gemma3-270m --records 50
    PYTHONPATH=src python -m benchmarks.lm_eval_compare --precision bf16   # bf16 autocast in both

Both score the same (context, continuation) strings: ARC-Easy and PIQA with lm-eval's own templates
(`arc_easy.yaml`, `piqa.yaml`: "Question: {question}\\nAnswer:" and " {choice}"), TruthfulQA MC1 with the
LoFiT/ITI prompt (instruction + 6-shot primer + "Q: ...\\nA:", each answer " {answer}"), built from the
first N records of lofit's data files (no download). lm-eval runs its own Hugging Face scorer
(`lm_eval.models.huggingface.HFLM.loglikelihood`) on the model object lofit loaded; lofit runs
`lofit.evaluation.score_continuations(..., scorer="fast")`. Both get the same batch size: rows per forward
pass (lofit: one question with all its options per row; lm-eval: one context + option per row). Timings are the process
CPU time and wall time of each whole call, the two scorers alternating (`--repeats` rounds; the
median is reported), in one process on one machine. "Identical choices" counts the records where both
pick the same option (argmax of the summed log-probs; TruthfulQA: among the MC1 options).

`--precision` sets both scorers alike: fp32 (the model's own weights, no autocast) or bf16 (the fp32
weights under `torch.autocast(bfloat16)`: lofit's `evaluation_precision(model, "bf16")`, lm-eval's
`HFLM(..., mixed_precision_dtype="bfloat16")`). The body-token column says where a ratio comes from:
tokens through the transformer body per scorer, without padding, counted on lm-eval's tokenisation of
each pair. lm-eval: Σ over options of len(context + option) − 1. lofit (`lofit.evaluation.packed`): the
prefix all questions share, once; per question the rest of what its options share, once; each option's
own tokens.

Writes benchmarks/results/lm_eval_compare[_<model>].json and .md (command, machine, versions) after every
task, keeping the rows of other tasks from earlier runs (run the tasks one per invocation if you like).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .harness.internals import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
TEMPLATES = {  # lm-eval's task templates (lm_eval/tasks/arc/arc_easy.yaml, piqa/piqa.yaml)
    "arc_easy": "Question: {question}\nAnswer:",
    "piqa": "Question: {question}\nAnswer:",
}


def argmax(values: list[float]) -> int:
    """Index of the first maximum (lm-eval's np.argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mc_requests(task: str, count: int) -> tuple[list[dict[str, Any]], list[tuple[str, list[str]]]]:
    """The first `count` "mc" records of `task` and their (context, continuations)."""
    from lofit.tasks import load_task

    records = list(load_task(task).test)[:count]
    template = TEMPLATES[task]
    return records, [
        (template.format(question=r["question"]), [" " + c for c in r["choices"]]) for r in records
    ]


def truthfulqa_requests(count: int) -> tuple[list[dict[str, Any]], list[tuple[str, list[str]]], list[int]]:
    """The first `count` TruthfulQA fold-0 test records, their requests and how many MC1 options each has."""
    from lofit.tasks import load_task

    from .harness.internals import load_prompt_parts, truthfulqa_mc_requests

    records = list(load_task("truthfulqa", fold=0).test)[:count]
    instruction, primer = load_prompt_parts()
    requests, layouts = truthfulqa_mc_requests(records, instruction, primer)
    pairs, mc1_sizes = [], []
    for request, (_answers, best, _true, false) in zip(requests, layouts, strict=True):
        options = [best, *false]  # MC1: the best answer against every incorrect one
        pairs.append((request.context, [" " + a for a in options]))
        mc1_sizes.append(len(options))
    return records, pairs, mc1_sizes


def lofit_scores(
    model: Any, tokenizer: Any, pairs: list[tuple[str, list[str]]], batch_size: int
) -> list[list[float]]:
    from lofit.evaluation import ScoringRequest, score_continuations

    requests = [ScoringRequest(context, continuations) for context, continuations in pairs]
    return score_continuations(model, tokenizer, requests, batch_size=batch_size, progress=False)


def body_tokens(tokenizer: Any, pairs: list[tuple[str, list[str]]]) -> dict[str, int]:
    """Tokens each scorer runs through the transformer body (no padding, see the module docstring).

    lofit: the prefix every request shares (up to the first option token), once; then per question the
    rest of what its options share, once, and each option's own tokens.
    """
    from .harness.internals import common_prefix_length, shared_length

    questions = []
    for context, continuations in pairs:
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        encoded = [context_ids + tokenizer(c, add_special_tokens=False).input_ids for c in continuations]
        questions.append((len(context_ids), encoded))
    everything = [ids for _, encoded in questions for ids in encoded]
    prefix = min(common_prefix_length(everything), min(boundary for boundary, _ in questions))
    counts = {"lofit": prefix, "lm_eval": 0}
    for _, sequences in questions:
        shared = shared_length(sequences)
        counts["lm_eval"] += sum(len(s) - 1 for s in sequences)
        counts["lofit"] += shared - prefix + sum(len(s) - 1 - shared for s in sequences)
    return counts


def lm_eval_scores(lm: Any, pairs: list[tuple[str, list[str]]]) -> list[list[float]]:
    from lm_eval.api.instance import Instance

    instances = []
    for doc_id, (context, continuations) in enumerate(pairs):
        for index, continuation in enumerate(continuations):
            instances.append(
                Instance(
                    request_type="loglikelihood",
                    doc={},
                    arguments=(context, continuation),
                    idx=index,
                    metadata=("bench", doc_id, 1),
                )
            )
    flat = iter(value for value, _greedy in lm.loglikelihood(instances, disable_tqdm=True))
    return [[next(flat) for _ in continuations] for _context, continuations in pairs]


def logprob_differences(ours: list[list[float]], theirs: list[list[float]]) -> list[float]:
    """|a - b| per option; a non-finite log-prob on either side is refused (no metric from NaN or inf).

    Example:
        >>> logprob_differences([[-1.0, -2.0]], [[-1.5, -2.0]])
        [0.5, 0.0]
    """
    values = [v for row in (*ours, *theirs) for v in row]
    if not all(math.isfinite(v) for v in values):
        raise ValueError("a scorer returned a non-finite log-probability; no comparison is reported")
    return [
        abs(a - b)
        for row_a, row_b in zip(ours, theirs, strict=True)
        for a, b in zip(row_a, row_b, strict=True)
    ]


def timed(call: Any) -> tuple[Any, float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    result = call()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--records", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks", nargs="+", default=["arc_easy", "piqa", "truthfulqa_mc1"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="both scorers' compute precision"
    )
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads for both (default: all)"
    )
    args = parser.parse_args(argv)

    from lm_eval.models.huggingface import HFLM

    from lofit import load_model

    model, tokenizer = load_model(args.model)
    model.eval()
    mixed = None if args.precision == "fp32" else "bfloat16"
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, mixed_precision_dtype=mixed)
    torch.set_num_threads(args.threads)  # HFLM's set-up (accelerate) drops torch to one thread
    suffix = "" if args.model == "smollm2-135m" else f"_{Path(args.model).name.replace('.', '_')}"
    suffix += "" if args.precision == "fp32" else f"_{args.precision}"
    out = args.out or RESULTS / f"lm_eval_compare{suffix}"
    for task in args.tasks:
        row = compare_task(task, model, tokenizer, lm, args)
        print(json.dumps({k: v for k, v in row.items() if k != "all_timings"}), flush=True)
        write_results(out, row, args)  # after every task: a long task never loses the finished ones


def compare_task(task: str, model: Any, tokenizer: Any, lm: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Both scorers on the first `args.records` records of `task`, alternating; choices and timings compared."""
    if task == "truthfulqa_mc1":
        _records, pairs, _sizes = truthfulqa_requests(args.records)
    else:
        _records, pairs = mc_requests(task, args.records)
    from .harness.internals import evaluation_precision

    def lofit_call() -> list[list[float]]:
        with evaluation_precision(model, args.precision):
            return lofit_scores(model, tokenizer, pairs, args.batch_size)

    timings: dict[str, list[tuple[float, float]]] = {"lofit": [], "lm_eval": []}
    results: dict[str, list[list[float]]] = {}
    for _ in range(args.repeats):
        for name, call in (
            ("lofit", lofit_call),
            ("lm_eval", lambda: lm_eval_scores(lm, pairs)),
        ):
            with torch.no_grad():
                results[name], cpu_s, wall_s = timed(call)
            timings[name].append((cpu_s, wall_s))
    picks = {name: [argmax(s) for s in scores] for name, scores in results.items()}
    identical = sum(a == b for a, b in zip(picks["lofit"], picks["lm_eval"], strict=True))
    differences = logprob_differences(results["lofit"], results["lm_eval"])
    cpu = {name: statistics.median(c for c, _ in values) for name, values in timings.items()}
    wall = {name: statistics.median(w for _, w in values) for name, values in timings.items()}
    return {
        "task": task,
        "records": len(pairs),
        "continuations": sum(len(c) for _, c in pairs),
        "identical_choices": identical,
        "body_tokens": body_tokens(tokenizer, pairs),
        "max_abs_logprob_difference": max(differences),
        "cpu_s": cpu,
        "wall_s": wall,
        "speedup_cpu": cpu["lm_eval"] / cpu["lofit"],
        "speedup_wall": wall["lm_eval"] / wall["lofit"],
        "all_timings": timings,
        "environment": environment(args),
    }


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Command, date, machine, load and versions of this run."""
    import lm_eval
    import transformers

    from lofit import __version__

    return {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor()} {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads",
        "load_average": os.getloadavg(),
        "versions": {
            "lofit": __version__,
            "lm_eval": getattr(lm_eval, "__version__", "?"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "model": args.model,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "precision": args.precision,
    }


def write_results(out: Path, row: dict[str, Any], args: argparse.Namespace) -> None:
    """Merge `row` into `out`.json (replacing an earlier row of the same task) and rewrite `out`.md."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows = [r for r in rows if r["task"] != row["task"]] + [row]
    atomic_write_json(path, {"rows": rows})  # never through a symbolic link, whole or not at all
    lines = [
        f"# lofit vs lm-evaluation-harness scoring ({args.model}, {args.precision} in both)",
        "",
        "Each task: both scorers on the same (context, continuation) strings in one process, alternating, "
        "median of the rounds; the ratio is lm-eval's time over lofit's (above 1: lofit faster). lofit "
        "packs all options of a question in one row (`batch_size` questions per pass), lm-eval runs "
        "context + option per row (`batch_size` rows per pass). Body tokens: tokens through the "
        "transformer body without padding (lm-eval / lofit); lofit also runs the LM head on scored "
        "positions only, lm-eval on every position.",
        "",
        "| task | records | options | identical choices | max abs Δ log-prob | body tokens lm-eval / lofit "
        "| lofit wall s | lm-eval wall s | lm-eval / lofit (wall) | lofit CPU s | lm-eval CPU s "
        "| lm-eval / lofit (CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tokens = r.get("body_tokens")
        token_cell = (
            f"{tokens['lm_eval']:,} / {tokens['lofit']:,} = {tokens['lm_eval'] / tokens['lofit']:.2f}x"
            if tokens
            else "—"
        )
        lines.append(
            f"| {r['task']} | {r['records']} | {r['continuations']} | {r['identical_choices']}/{r['records']} "
            f"| {r['max_abs_logprob_difference']:.1e} | {token_cell} "
            f"| {r['wall_s']['lofit']:.1f} | {r['wall_s']['lm_eval']:.1f} "
            f"| **{r['speedup_wall']:.2f}x** | {r['cpu_s']['lofit']:.1f} | {r['cpu_s']['lm_eval']:.1f} "
            f"| {r['speedup_cpu']:.2f}x |"
        )
    lines += ["", "Runs:", ""]
    for r in rows:
        env = r["environment"]
        lines.append(
            f"- {r['task']}: `{env['command']}` on {env['date']}; {env['machine']}; load average at the end "
            f"{[round(x, 2) for x in env['load_average']]}; batch size {env['batch_size']} for both; "
            f"{env['repeats']} rounds; versions {env['versions']}"
        )
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
