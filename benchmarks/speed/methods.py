"""The methods `benchmarks.speed` compares, all on ONE model object with the same loop and loss.

The base model carries every adapter at once: LoFiT wrappers on the attention output projections (a
step-1 adapter with scales on all heads and one offset adapter per head set) and peft LoRA r8 on q,v.
A method switches on its adapter, switches the others off and marks only its own parameters trainable;
a switched-off adapter is a pass-through (one Python call per layer). Every training method runs the
same step: lofit's own `optimizer_step` (the one `train_offsets` and `select_heads` run: the objective's
loss through one `TokenScorer`, backward, the regularizer, clipping, AdamW), under the bench's autocast.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lofit import LofitConfig, LofitModel, get_lofit_model
from lofit.training import (
    DPOObjective,
    Example,
    Objective,
    SFTObjective,
    TokenScorer,
    TrainingConfig,
    TrainingHistory,
)

from ..harness.internals import (
    HeadMap,
    LoopPosition,
    LoopState,
    TrainingRun,
    make_accelerator,
    optimizer_step,
)
from . import knobs

STEP1_L1 = 5e-4  # λ of step 1 (TruthfulQA's); only its cost matters here


@dataclass(frozen=True)
class Method:
    """One configuration to time: a forward pass or a training step of some parameters."""

    name: str
    label: str
    kind: str = "train"  # "train" or "forward"
    lofit_adapter: str | None = None  # LoFiT adapter switched on (None = all LoFiT off)
    lora: bool = False  # peft LoRA switched on and trained
    full: bool = False  # every base weight trained (full fine-tuning)
    train_mode: bool = False  # module.train(): LoRA dropout active (the trainer runs eval mode)
    l1: float = 0.0  # L1 penalty on the scales (step 1)
    lr: float = 1e-2
    # knobs of the optimisation ablations (defaults = the optimised configuration)
    data: str = "sft"  # which batch list of the bench it runs on
    objective: str = "sft"  # "sft" or "dpo"
    reference: str = "cached"  # DPO: "cached" reference log-probs or "recompute" them every step
    scorer_mode: str = "gathered"  # TokenScorer mode: "gathered" or "full" logits
    precision: str = "default"  # "default" (the target's autocast), "fp32" or "bf16"
    input_grads: bool = False  # force gradients down to layer 0 (embedding outputs require grad)
    checkpointing: str = "off"  # "off", "layers" (non-reentrant, per layer) or "hf" (HF's enable)
    head_op: str = "vectorised"  # "vectorised" (lofit.adapters.layer) or "loop" (a Python loop over heads)
    compile: bool = False  # torch.compile every decoder layer
    attention: str = "default"  # attention implementation: "default" (the bench's), "eager" or "sdpa"
    weights: str = "default"  # frozen base weights: "default" (as loaded) or "fp32" (cast for the step)

    def with_changes(self, name: str, label: str, **changes: Any) -> Method:
        return replace(self, name=name, label=label, **changes)


def main_methods(
    head_sets: dict[str, HeadMap], full_finetune: bool, lora_dropout_variant: bool
) -> list[Method]:
    """Base forward, LoFiT step 1, step 2 per head set, PEFT LoRA (and with dropout), full fine-tuning."""
    methods = [
        Method("base_forward", "base model forward (no grad)", kind="forward"),
        Method(
            "lofit_step1", "LoFiT step 1: scales on all heads", lofit_adapter="step1", l1=STEP1_L1, lr=5e-3
        ),
    ]
    for name, heads in head_sets.items():
        count = sum(len(h) for h in heads.values())
        lowest = min(layer for layer, h in heads.items() if h)
        methods.append(
            Method(
                f"lofit_offsets_{name}",
                f"LoFiT step 2: offsets on {count} heads ({name}, lowest layer {lowest})",
                lofit_adapter=f"offsets_{name}",
            )
        )
    methods.append(Method("lora", "PEFT LoRA r8 q,v (eval mode, as the trainer)", lora=True, lr=1e-4))
    methods.append(
        Method("lora_again", "PEFT LoRA again (A/A control: run-to-run noise)", lora=True, lr=1e-4)
    )
    if lora_dropout_variant:
        methods.append(
            Method(
                "lora_dropout",
                "PEFT LoRA r8 q,v (train mode, dropout 0.1)",
                lora=True,
                train_mode=True,
                lr=1e-4,
            )
        )
    if full_finetune:
        methods.append(Method("full_ft", "full fine-tuning (all weights)", full=True, lr=1e-5))
    return methods


@dataclass
class Bench:
    """A model with every adapter attached, its scorer and objective, and one optimizer per method."""

    model: nn.Module
    lofit: LofitModel
    peft: Any | None
    objectives: dict[str, Objective]  # "sft", "dpo" (cached reference), "dpo_recompute"
    scorer: TokenScorer
    device: torch.device
    autocast_dtype: torch.dtype | None
    attention: str = "sdpa"  # attention implementation of training and forward steps
    data: dict[str, list[list[Example]]] = field(default_factory=dict)  # named lists of batches
    runs: dict[str, tuple[TrainingRun, LoopState]] = field(default_factory=dict)  # one per trained method

    @classmethod
    def build(
        cls,
        model: nn.Module,
        tokenizer: Any,
        head_sets: dict[str, HeadMap],
        autocast_dtype: torch.dtype | None,
        scorer_mode: str = "gathered",
        with_lora: bool = True,
        attention: str = "sdpa",
    ) -> Bench:
        lofit = get_lofit_model(model, LofitConfig(heads=None, use_scale=True, use_offset=False), "step1")
        for name, heads in head_sets.items():
            lofit.add_adapter(f"offsets_{name}", LofitConfig(heads=heads, use_scale=False, use_offset=True))
        peft_model = None
        if with_lora:
            from lofit.baselines import get_lora_model

            peft_model = get_lora_model(model)
        device = next(model.parameters()).device
        objectives: dict[str, Objective] = {
            "sft": SFTObjective(tokenizer),
            "dpo": DPOObjective(tokenizer),
            "dpo_recompute": RecomputingDPO(tokenizer),
        }
        return cls(
            model,
            lofit,
            peft_model,
            objectives,
            TokenScorer(lofit, scorer_mode),
            device,
            autocast_dtype,
            attention,
        )

    def objective_for(self, method: Method) -> Objective:
        if method.objective == "dpo":
            return self.objectives["dpo_recompute" if method.reference == "recompute" else "dpo"]
        return self.objectives["sft"]

    def cache_references(self, name: str) -> None:
        """Compute the DPO reference log-probs of data `name` once, with every adapter off."""
        examples = [e for batch in self.data[name] for e in batch]
        with self.active(Method("reference", "reference", kind="forward")), self.autocast():
            self.objectives["dpo"].prepare(self.scorer, examples, 16, self.device)

    # ------------------------------------------------------------------------------ switching
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if "lora_" in n]

    def base_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if "lora_" not in n and "lofit_adapters" not in n]

    def trainable(self, method: Method) -> list[nn.Parameter]:
        if method.kind == "forward":
            return []
        if method.full:
            return self.base_parameters()
        if method.lora:
            return self.lora_parameters()
        assert method.lofit_adapter is not None
        return self.lofit.adapter_parameters(method.lofit_adapter)

    @contextlib.contextmanager
    def active(self, method: Method) -> Iterator[list[nn.Parameter]]:
        """Switch the model to `method`; yield its trainable parameters; switch back to all-off."""
        for param in self.model.parameters():
            param.requires_grad_(False)
        projections = self.lofit.projections()
        if method.lofit_adapter is not None:
            self.lofit.set_adapter(method.lofit_adapter)
        for projection in projections:
            projection.adapter_disabled = method.lofit_adapter is None
        if self.peft is not None:
            if method.lora:
                self.peft.base_model.enable_adapter_layers()
            else:
                self.peft.base_model.disable_adapter_layers()
        elif method.lora:
            raise ValueError("this bench was built without LoRA")
        params = self.trainable(method)
        for param in params:
            param.requires_grad_(True)
        self.model.train(method.train_mode)
        snapshot = [p.detach().clone() for p in params] if method.full else None
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(knobs.scorer_mode(self.scorer, method.scorer_mode))
                stack.enter_context(self._precision(method.precision))
                if method.input_grads:
                    stack.enter_context(knobs.input_grads(self.model))
                if method.checkpointing != "off":
                    stack.enter_context(knobs.checkpointing(self.model, method.checkpointing))
                if method.head_op != "vectorised":
                    stack.enter_context(knobs.head_op(method.head_op))
                if method.compile:
                    stack.enter_context(knobs.compiled_layers(self.model))
                attention = self.attention if method.attention == "default" else method.attention
                stack.enter_context(knobs.attention(self.model, attention))
                if method.weights != "default":
                    stack.enter_context(knobs.weights_dtype(self.base_parameters(), method.weights))
                yield params
        finally:
            if snapshot is not None:  # full fine-tuning must not change the model the others run on
                with torch.no_grad():
                    for param, saved in zip(params, snapshot, strict=True):
                        param.copy_(saved)
            for param in params:
                param.requires_grad_(False)
                param.grad = None
            for projection in projections:
                projection.adapter_disabled = True
            if self.peft is not None:
                self.peft.base_model.disable_adapter_layers()
            self.model.eval()

    @contextlib.contextmanager
    def _precision(self, precision: str) -> Iterator[None]:
        saved = self.autocast_dtype
        if precision != "default":
            self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
        try:
            yield
        finally:
            self.autocast_dtype = saved

    def regularizer(self, method: Method) -> Callable[[], torch.Tensor] | None:
        if method.l1 <= 0 or method.lofit_adapter is None:
            return None
        scales = self.lofit.adapter_parameters(method.lofit_adapter, kind="scale")
        l1 = method.l1
        return lambda: l1 * torch.stack([s.abs().sum() for s in scales]).sum()

    # ---------------------------------------------------------------------------------- steps
    def step_fn(self, method: Method, params: list[nn.Parameter]) -> Callable[[list[Example]], float]:
        """A function running one step of `method` on a batch; returns the loss (forces a device sync)."""
        objective = self.objective_for(method)
        if method.kind == "forward":
            return lambda examples: forward_step(self, objective, examples)
        if method.name not in self.runs:
            self.runs[method.name] = training_run(self, method, objective, params)
        run, state = self.runs[method.name]
        return lambda examples: train_step(self, run, state, examples)


def forward_step(bench: Bench, objective: Objective, examples: list[Example]) -> float:
    with torch.no_grad(), bench.autocast():
        out = objective.loss(bench.scorer, examples, bench.device)
    return float(out.loss_sum)


def training_run(
    bench: Bench, method: Method, objective: Objective, params: list[nn.Parameter]
) -> tuple[TrainingRun, LoopState]:
    """`method`'s training run as lofit's loop holds it: AdamW (weight decay 0), clipping at 1, constant lr.

    The accelerator runs in fp32: the method's precision is the bench's autocast around each step (a
    method may switch it), not accelerate's mixed precision (one process-wide setting).
    """
    config = TrainingConfig(lr=method.lr, max_grad_norm=1.0, precision="fp32", progress=False)
    accelerator = make_accelerator("fp32")
    optimizer = accelerator.prepare_optimizer(
        torch.optim.AdamW(params, lr=method.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda step: 1.0)
    run = TrainingRun(
        bench.model, objective, [], [], config, f"speed {method.name}", bench.regularizer(method),
        accelerator, bench.device, params, optimizer, scheduler, bench.scorer, TrainingHistory(), {},
        False, None,
    )  # fmt: skip
    generator = torch.Generator()
    position = LoopPosition(step=0, epoch=1, batch=0, generator_state=generator.get_state())
    started = time.perf_counter()
    return run, LoopState(position, generator, started, started)


def train_step(bench: Bench, run: TrainingRun, state: LoopState, examples: list[Example]) -> float:
    """One optimizer step through lofit's `optimizer_step`; returns the batch's mean loss (a device sync)."""
    with bench.autocast():
        record = optimizer_step(run, state, examples, epoch=1)
    return float(record["loss"])


class RecomputingDPO(DPOObjective):
    """Benchmark-only DPO that recomputes the reference log-probs (a no-grad base pass) every step."""

    def loss(self, scorer: TokenScorer, examples: Any, device: Any) -> Any:
        fresh = [Example(e.index, e.sequences) for e in examples]
        self.prepare(scorer, fresh, len(fresh), device)
        return super().loss(scorer, fresh, device)
