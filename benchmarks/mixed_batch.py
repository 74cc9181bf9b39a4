"""Mixed-adapter batches vs one adapter: the cost of `adapter_names=`.

On the bundled SmolLM2-135M (CPU, one thread), 8 offset adapters (each on its own random `--k` of the
heads) serve a batch of 16 rows, 2 rows each, through `model(..., adapter_names=[...])` and
`model.generate(..., adapter_names=[...])`; the reference is the same batch with one adapter active
(the usual single-adapter path). Two workloads: forward scoring (a [16, --seq-len] batch) and greedy
generation ([16, --prompt-len] prompts, --new-tokens new tokens, KV cache). The two modes run side by
side, interleaved and alternating which goes first, `--repeats` times; the overhead is the ratio of
their median times (process CPU time, the primary clock, since the machine is shared; wall time too).
Before timing, the mixed rows are checked against each adapter run alone on the same batch.

    OMP_NUM_THREADS=1 nice -n 5 python -m benchmarks.mixed_batch

Writes benchmarks/results/mixed_batch.json and .md (`--out` elsewhere). `--tiny` runs a few-layer random
llama for smoke tests.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lofit import LofitConfig, get_lofit_model

from . import RESULTS
from .harness.environment import environment
from .harness.internals import atomic_write_json, atomic_write_text

ADAPTERS = 8
ROWS = 16


def random_heads(num_layers: int, num_heads: int, fraction: float, seed: int) -> dict[int, list[int]]:
    """A seeded random `fraction` of all heads (at least one), as layer -> heads."""
    every = [(layer, head) for layer in range(num_layers) for head in range(num_heads)]
    chosen = random.Random(seed).sample(every, max(1, round(fraction * len(every))))
    heads: dict[int, list[int]] = {}
    for layer, head in sorted(chosen):
        heads.setdefault(layer, []).append(head)
    return heads


def build(base: nn.Module, fraction: float, use_scale: bool) -> Any:
    """Wrap `base` with ADAPTERS random adapters "a0".."a7" (offsets ~ N(0, 0.05)), in eval mode."""
    model = None
    for index in range(ADAPTERS):
        torch.manual_seed(index)
        layers, heads = base.config.num_hidden_layers, base.config.num_attention_heads
        config = LofitConfig(
            heads=random_heads(layers, heads, fraction, index), use_scale=use_scale, init_std=0.05
        )
        if model is None:
            model = get_lofit_model(base, config, "a0")
        else:
            model.add_adapter(f"a{index}", config)
    assert model is not None
    model.set_adapter("a0")
    return model.eval()


def check_rows(model: Any, ids: torch.Tensor, names: list[str]) -> float:
    """Max |mixed - alone| over the logits of every row (each row vs its adapter on the whole batch)."""
    with torch.inference_mode():
        mixed = model(input_ids=ids, adapter_names=names).logits
        worst = 0.0
        for name in sorted(set(names)):
            model.set_adapter(name)
            alone = model(input_ids=ids).logits
            rows = [i for i, n in enumerate(names) if n == name]
            worst = max(worst, (mixed[rows] - alone[rows]).abs().max().item())
    model.set_adapter("a0")
    return worst


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def compare(single: Callable[[], Any], mixed: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Interleaved timings of the two modes (alternating which runs first) after one warm-up each."""
    single(), mixed()
    times: dict[str, list[tuple[float, float]]] = {"single": [], "mixed": []}
    for repeat in range(repeats):
        order = [("single", single), ("mixed", mixed)]
        for name, fn in order if repeat % 2 == 0 else order[::-1]:
            times[name].append(timed(fn))
    result: dict[str, Any] = {"repeats": repeats}
    for clock, column in (("cpu", 0), ("wall", 1)):
        medians = {mode: statistics.median(t[column] for t in times[mode]) for mode in times}
        pairs = [m[column] / s[column] for s, m in zip(times["single"], times["mixed"], strict=True)]
        result[clock] = {
            "single_median_s": medians["single"],
            "mixed_median_s": medians["mixed"],
            "ratio_of_medians": medians["mixed"] / medians["single"],
            "median_pair_ratio": statistics.median(pairs),
            "single_s": [t[column] for t in times["single"]],
            "mixed_s": [t[column] for t in times["mixed"]],
        }
    return result


def run(model: Any, vocab: int, args: argparse.Namespace) -> dict[str, Any]:
    """Check exactness, then time forward scoring and greedy generation, single vs mixed."""
    generator = torch.Generator().manual_seed(0)
    names = [f"a{i % ADAPTERS}" for i in range(ROWS)]
    scoring = torch.randint(3, vocab, (ROWS, args.seq_len), generator=generator)
    prompts = torch.randint(3, vocab, (ROWS, args.prompt_len), generator=generator)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               use_cache=True, pad_token_id=0)  # fmt: skip
    max_diff = check_rows(model, scoring, names)

    def forward(adapter_names: list[str] | None) -> Callable[[], Any]:
        return lambda: model(input_ids=scoring, adapter_names=adapter_names).logits

    def generate(adapter_names: list[str] | None) -> Callable[[], Any]:
        return lambda: model.generate(prompts, adapter_names=adapter_names, **gen)

    with torch.inference_mode():
        same = torch.equal(model.generate(prompts, adapter_names=["a0"] * ROWS, **gen), generate(None)())
        pairs = {"forward": (forward(None), forward(names)), "generate": (generate(None), generate(names))}
        results = {w: compare(*pairs[w], args.repeats) for w in args.workloads}
    results["check"] = {"max_abs_logit_diff_vs_alone": max_diff, "all_a0_mixed_equals_single": same}
    return results


def render(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        "# Mixed-adapter batches vs one adapter",
        "",
        f"Command: `{report['command']}`",
        f"Machine: {m['cpu']}, {m['cpu_threads']} thread(s) of {m['cpu_count']} cores, load average "
        f"{m['load_average_at_start']} at start, {m['load_average_at_end']} at end; {m['platform']}",
        f"Versions: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}",
        f"Model: {s['model']} ({s['dtype']}); {ADAPTERS} offset adapters{' with scales' if s['use_scale'] else ''}"
        f", each on a random {s['k']:.0%} of the heads; batch of {ROWS} rows (2 per adapter) vs the same "
        "batch with one adapter active.",
        f"Forward scoring: [{ROWS}, {s['seq_len']}] tokens. Greedy generation: [{ROWS}, {s['prompt_len']}] "
        f"prompts + {s['new_tokens']} new tokens (KV cache). {s['repeats']} interleaved repeats per mode.",
        "",
        "| workload | clock | one adapter (median s) | 8 adapters mixed (median s) | ratio of medians | median pair ratio |",
        "|---|---|---|---|---|---|",
    ]
    workloads = [w for w in ("forward", "generate") if w in report["results"]]
    for workload in workloads:
        for clock in ("cpu", "wall"):
            r = report["results"][workload][clock]
            lines.append(
                f"| {workload} | {'process CPU' if clock == 'cpu' else 'wall'} | {r['single_median_s']:.3f} | "
                f"{r['mixed_median_s']:.3f} | {r['ratio_of_medians']:.3f} | {r['median_pair_ratio']:.3f} |"
            )
    check = report["results"]["check"]
    overheads = {w: report["results"][w]["cpu"]["ratio_of_medians"] - 1 for w in workloads}
    lines += [
        "",
        "Overhead (process CPU, ratio of medians - 1): "
        + ", ".join(f"{w} {o:+.1%}" for w, o in overheads.items())
        + f"; target <= +3%: {'met' if max(overheads.values()) <= 0.03 else 'NOT met'}.",
        f"Exactness check: max |logit(mixed row) - logit(its adapter alone)| = "
        f"{check['max_abs_logit_diff_vs_alone']:.2e}; generation with adapter_names all 'a0' equals the "
        f"single-adapter generation: {check['all_a0_mixed_equals_single']}.",
        f"Total run time: {report['seconds']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tiny", action="store_true", help="a few-layer random llama (smoke test)")
    parser.add_argument("--k", type=float, default=0.03, help="fraction of heads per adapter")
    parser.add_argument("--use-scale", action="store_true")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--workloads", nargs="+", choices=["forward", "generate"], default=["forward", "generate"]
    )
    parser.add_argument("--name", default="mixed_batch", help="stem of the result files")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> nn.Module:
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=256)  # fmt: skip
        return LlamaForCausalLM(config).eval()
    from lofit import load_model

    return load_model(args.model)[0]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    base = load(args)
    report: dict[str, Any] = {
        "command": " ".join(
            ["python", "-m", "benchmarks.mixed_batch", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": environment(),
        "settings": {
            "model": "tiny random llama" if args.tiny else args.model,
            "dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
            "k": args.k,
            "use_scale": args.use_scale,
            "seq_len": args.seq_len,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "adapters": ADAPTERS,
            "rows": ROWS,
        },
    }
    model = build(base, args.k, args.use_scale)
    report["results"] = run(model, base.config.vocab_size, args)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{args.name}.json", report)
    atomic_write_text(args.out / f"{args.name}.md", render(report))
    print(render(report))
    return report


if __name__ == "__main__":
    main()
