"""Greedy generation with an unmerged LoFiT adapter vs the base model: a direct interleaved A/B.

The same shapes as speed.py's CPU target (8 prompts × 64 tokens + 32 new tokens, KV cache), offsets on one
head in each of 27 layers (the widest spread of a 10% set), fp32, weights frozen; process CPU time of each
`generate` call, base and adapted alternating (A B, B A, ...). Writes results/generate_overhead.json.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/generate_overhead.py --repeats 10
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import lofit

OUT = Path(__file__).resolve().parent / "results" / "generate_overhead.json"


def generate(model: Any, prompt: torch.Tensor, new_tokens: int) -> float:
    """Process CPU seconds of one greedy `generate` call of exactly `new_tokens` tokens."""
    started = time.process_time()
    with torch.no_grad():
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    base, _ = lofit.load_model()
    base.float().eval().requires_grad_(False)
    heads = {layer: [layer % 9] for layer in range(27)}
    adapted = lofit.get_lofit_model(copy.deepcopy(base), lofit.LofitConfig(heads=heads, init_std=0.01)).eval()
    prompt = torch.randint(100, 1000, (8, 64))
    models = {"base": base, "lofit": adapted}
    for model in models.values():
        generate(model, prompt, 32)  # warm-up
    seconds: dict[str, list[float]] = {"base": [], "lofit": []}
    for repeat in range(args.repeats):
        for name in ("base", "lofit") if repeat % 2 == 0 else ("lofit", "base"):
            seconds[name].append(generate(models[name], prompt, 32))
    ratios = [b / a for b, a in zip(seconds["base"], seconds["lofit"], strict=True)]
    result = {
        "command": f"OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/generate_overhead.py --repeats {args.repeats}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}",
        "versions": f"torch {torch.__version__}",
        "seconds": seconds,
        "speed_vs_base_median": statistics.median(ratios),
        "speed_vs_base_range": [min(ratios), max(ratios)],
    }
    OUT.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("speed_vs_base_median", "speed_vs_base_range")}))


if __name__ == "__main__":
    main()
