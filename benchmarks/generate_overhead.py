"""Greedy generation with an unmerged LoFiT adapter vs the base model: a direct interleaved A/B.

The same shapes as the speed benchmark's CPU target (8 prompts × 64 tokens + 32 new tokens, KV cache),
offsets on one head in each of up to 27 layers (the widest spread of a 10% set on the bundled model),
fp32, weights frozen; process CPU time of each `generate` call, base and adapted alternating (A B, B A,
...). Writes results/generate_overhead.json.

    OMP_NUM_THREADS=1 python -m benchmarks.generate_overhead --repeats 10
    python -m benchmarks.generate_overhead --model DIR --repeats 2 --out FILE   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import lofit

from . import RESULTS
from .harness.environment import environment
from .harness.internals import atomic_write_json

OUT = RESULTS / "generate_overhead.json"


def generate(model: Any, prompt: torch.Tensor, new_tokens: int, pad_id: int) -> float:
    """Process CPU seconds of one greedy `generate` call of exactly `new_tokens` tokens."""
    started = time.process_time()
    with torch.no_grad():
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)  # fmt: skip
    return time.process_time() - started


def spread_heads(num_layers: int, num_heads: int, count: int = 27) -> dict[int, list[int]]:
    """One head in each of the first `count` layers, cycling through the heads.

    Example:
        >>> spread_heads(3, 2)
        {0: [0], 1: [1], 2: [0]}
    """
    return {layer: [layer % num_heads] for layer in range(min(count, num_layers))}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--model", default="smollm2-135m", help="bundled name or local directory")
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON file to write")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    torch.manual_seed(0)
    base, tokenizer = lofit.load_model(args.model)
    base.float().eval().requires_grad_(False)
    heads = spread_heads(base.config.num_hidden_layers, base.config.num_attention_heads)
    adapted = lofit.get_lofit_model(copy.deepcopy(base), lofit.LofitConfig(heads=heads, init_std=0.01)).eval()
    prompt = torch.randint(min(100, tokenizer.vocab_size // 2), min(1000, tokenizer.vocab_size), (8, 64))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    models = {"base": base, "lofit": adapted}
    for model in models.values():
        generate(model, prompt, 32, pad_id)  # warm-up
    seconds: dict[str, list[float]] = {"base": [], "lofit": []}
    for repeat in range(args.repeats):
        for name in ("base", "lofit") if repeat % 2 == 0 else ("lofit", "base"):
            seconds[name].append(generate(models[name], prompt, 32, pad_id))
    ratios = [b / a for b, a in zip(seconds["base"], seconds["lofit"], strict=True)]
    given = " ".join(sys.argv[1:] if argv is None else argv)
    result = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} python -m benchmarks.generate_overhead {given}",
        "machine": environment(),
        "seconds": seconds,
        "speed_vs_base_median": statistics.median(ratios),
        "speed_vs_base_range": [min(ratios), max(ratios)],
    }
    atomic_write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("speed_vs_base_median", "speed_vs_base_range")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
