"""Inference speed: the base model vs the same model with a LoFiT adapter, unmerged and merged.

Three models in the inference dtype: the plain base model, a copy wrapped with the offset adapter
(unmerged), and a copy of that folded into its weights (`merge_and_unload`). They run interleaved
with a second pass of the base model (an A/A control: how much two identical models differ by noise),
in rotated orders so that each runs in each position equally often.
Workloads: scoring (one no-grad forward over the training batch, logits at every position) and greedy
generation with the KV cache (fixed number of new tokens).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from _speed_methods import Bench
from _speed_timing import synchronize
from torch import nn

from lofit.config import LofitConfig
from lofit.model import get_lofit_model
from lofit.objectives import Example

VARIANTS = ("base", "unmerged", "merged", "base_again")


@dataclass
class InferenceResult:
    workload: str
    tokens: int  # per call
    clock: str = "wall"  # primary clock: "wall" or "cpu" (process CPU time), as in `Timing`
    seconds: dict[str, list[float]] = field(default_factory=dict)
    cpu_seconds: dict[str, list[float]] = field(default_factory=dict)

    def times(self, variant: str, clock: str | None = None) -> list[float]:
        return (self.cpu_seconds if (clock or self.clock) == "cpu" else self.seconds)[variant]

    def tokens_per_s(self, variant: str, clock: str | None = None) -> float:
        return self.tokens / statistics.median(self.times(variant, clock))

    def ratio(self, variant: str, clock: str | None = None) -> float:
        """Median over repetitions of base time / variant time within the repetition (a speed ratio)."""
        pairs = zip(self.times("base", clock), self.times(variant, clock), strict=True)
        return statistics.median(b / v for b, v in pairs)

    def to_dict(self) -> dict[str, Any]:
        other = "wall" if self.clock == "cpu" else "cpu"
        return {
            "workload": self.workload,
            "tokens_per_call": self.tokens,
            "clock": self.clock,
            "tokens_per_s": {v: self.tokens_per_s(v) for v in self.seconds},
            "speed_vs_base": {v: self.ratio(v) for v in self.seconds if v != "base"},
            f"tokens_per_s_{other}": {v: self.tokens_per_s(v, other) for v in self.seconds},
            f"speed_vs_base_{other}": {v: self.ratio(v, other) for v in self.seconds if v != "base"},
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
        }


def inference_models(bench: Bench, adapter_name: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    """Tear the bench down into base / unmerged / merged models (the bench is unusable afterwards)."""
    heads = bench.lofit.selected_heads(adapter_name)
    params = bench.lofit.get_head_params(adapter_name)
    bench.optimizers.clear()
    for param in bench.model.parameters():
        param.grad = None
        param.requires_grad_(False)
    base = bench.lofit.unload()  # first: peft's unload would take the LoFiT wrappers for its own layers
    if bench.peft is not None:
        base = bench.peft.unload()  # LoRA layers out, original q/v projections back
    base.to(dtype).eval()
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
    unmerged = get_lofit_model(
        copy.deepcopy(base), LofitConfig(heads=heads, use_scale=False, use_offset=True, init_std=0.0)
    )
    unmerged.set_head_params(params)
    unmerged.eval()
    merged = copy.deepcopy(unmerged).merge_and_unload()
    merged.eval()
    return {"base": base, "unmerged": unmerged, "merged": merged, "base_again": base}


def score_call(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return run


def generate_call(model: nn.Module, prompt: torch.Tensor, new_tokens: int, pad_id: int) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return model.generate(  # type: ignore[operator]
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad_id,
            )

    return run


def measure_inference(
    models: dict[str, nn.Module],
    batch: list[Example],
    gen_batch: int,
    gen_prompt: int,
    gen_new: int,
    pad_id: int,
    device: torch.device,
    repeats: int,
    log: Callable[[str], None] = print,
    clock: str = "wall",
) -> tuple[list[InferenceResult], dict[str, float]]:
    """Interleaved timings of every workload and model; also the merged-vs-unmerged logit gap."""
    rows = [list(s.input_ids) for e in batch for s in e.sequences]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    prompt = torch.tensor([r[:gen_prompt] for r in rows[:gen_batch]], device=device)
    workloads = {
        "score": (
            {n: score_call(m, input_ids, attention_mask) for n, m in models.items()},
            int(attention_mask.sum()),
        ),
        "generate": (
            {n: generate_call(m, prompt, gen_new, pad_id) for n, m in models.items()},
            gen_batch * gen_new,
        ),
    }
    with torch.no_grad():
        reference = models["unmerged"](input_ids=input_ids, attention_mask=attention_mask).logits.float()
        merged = models["merged"](input_ids=input_ids, attention_mask=attention_mask).logits.float()
        base = models["base"](input_ids=input_ids, attention_mask=attention_mask).logits.float()
    mask = attention_mask.bool()
    checks = {
        "merged_vs_unmerged_max_abs_logit_diff": float((merged - reference)[mask].abs().max()),
        "merged_vs_unmerged_mean_abs_logit_diff": float((merged - reference)[mask].abs().mean()),
        "adapter_vs_base_max_abs_logit_diff": float((reference - base)[mask].abs().max()),
        "adapter_vs_base_mean_abs_logit_diff": float((reference - base)[mask].abs().mean()),
    }
    results = []
    for workload, (calls, tokens) in workloads.items():
        result = InferenceResult(
            workload, tokens, clock, {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}
        )
        for name in VARIANTS:  # warm-up
            calls[name]()
        # Rotations: every variant runs in every position (and after every other) equally often.
        count = repeats if workload == "score" else max(len(VARIANTS), repeats // 2)
        count = len(VARIANTS) * -(-count // len(VARIANTS))
        for repeat in range(count):
            shift = repeat % len(VARIANTS)
            order = VARIANTS[shift:] + VARIANTS[:shift]
            for name in order:
                synchronize(device)
                started, cpu_started = time.perf_counter(), time.process_time()
                calls[name]()
                synchronize(device)
                result.seconds[name].append(time.perf_counter() - started)
                result.cpu_seconds[name].append(time.process_time() - cpu_started)
        log(
            f"  inference {workload}: "
            + ", ".join(f"{v} {result.tokens_per_s(v):.0f} tok/s" for v in VARIANTS)
        )
        results.append(result)
    return results, checks
