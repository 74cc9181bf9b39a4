"""Inference speed: the base model vs the same model with a LoFiT adapter, unmerged and merged.

Three models in the inference dtype: the base model (frozen, with the LM-head pre-hook every LoFiT
model has, see `lofit.adapters.lm_head`), a copy wrapped with the offset adapter (unmerged), and a copy of that
folded into its weights (`merge_and_unload`). They run interleaved with a second pass of the base model
(an A/A control: how much two identical models differ by noise) and two other views of the base (without
the pre-hook; with requires_grad=True weights, as `from_pretrained` returns it), in rotated orders so
that each runs in each position equally often.
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
from torch import nn

from lofit import LofitConfig, get_lofit_model
from lofit.training import Example

from ..harness.internals import add_contiguous_input_hook, remove_contiguous_input_hook
from .methods import Bench
from .timing import synchronize

VARIANTS = ("base", "unmerged", "merged", "base_no_hook", "base_again", "base_trainable")
LABELS = {
    "base": "base model (frozen weights, LM-head pre-hook)",
    "unmerged": "LofitModel, adapter unmerged",
    "merged": "merge_and_unload()",
    "base_no_hook": "base, frozen, without the LM-head pre-hook",
    "base_again": "base again (A/A control)",
    "base_trainable": "base, weights requires_grad=True, no pre-hook",
}


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
    """Tear the bench down into the inference variants (the bench is unusable afterwards).

    base: the plain model, weights frozen like the others; unmerged: a copy wrapped with the adapter;
    merged: a copy of that after `merge_and_unload()` (only the adapted o_proj gain a bias);
    base_again: the base object again (A/A control); base_no_hook: the base without the LM-head
    pre-hook of `lofit.adapters.lm_head`; base_trainable: the same with requires_grad=True on its weights, as
    `from_pretrained` returns it (see `TrainableWeights`).
    """
    heads = bench.lofit.selected_heads(adapter_name)
    params = bench.lofit.get_head_params(adapter_name)
    bench.runs.clear()
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
    add_contiguous_input_hook(base)  # as every LoFiT model (unmerged or merged) has it
    return {
        "base": base,
        "unmerged": unmerged,
        "merged": merged,
        "base_no_hook": WithoutLmHeadHook(base),
        "base_again": base,
        "base_trainable": TrainableWeights(WithoutLmHeadHook(base)),
    }


class WithoutLmHeadHook(nn.Module):
    """Runs `model` with the LM-head pre-hook of `lofit.adapters.lm_head` taken off (restored after each call)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def _bare(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        remove_contiguous_input_hook(self.model)
        try:
            return fn(*args, **kwargs)
        finally:
            add_contiguous_input_hook(self.model)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._bare(self.model, *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        generate: Callable[..., Any] = getattr(self.model, "generate")  # noqa: B009 (nn.Module typing)
        return self._bare(generate, *args, **kwargs)


class TrainableWeights(nn.Module):
    """Runs `model` with requires_grad=True on its weights (restored after each call).

    On CPU, torch.matmul does not fold a non-contiguous [batch, 1, hidden] input times a weight that
    needs no grad into one matrix product: it expands the weight per batch row and copies it. HF
    generate hits this at the LM head of every prefill (`lm_head(hidden[:, -1:, :])`), so a frozen
    model without `lofit.adapters.lm_head`'s pre-hook and with requires_grad=False generates slower than the
    same model as `from_pretrained` returns it. This variant measures that gap.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def _flagged(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        params = list(self.model.parameters())
        saved = [p.requires_grad for p in params]
        for param in params:
            param.requires_grad_(True)
        try:
            return fn(*args, **kwargs)
        finally:
            for param, flag in zip(params, saved, strict=True):
                param.requires_grad_(flag)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._flagged(self.model, *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        generate: Callable[..., Any] = getattr(self.model, "generate")  # noqa: B009 (nn.Module typing)
        return self._flagged(generate, *args, **kwargs)


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
        count = repeats if workload == "score" else max(1, repeats // 2)
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
