"""A one-pass head selector: the gradient of the task loss with respect to every head's scale at A = 0.

Step 1 of LoFiT trains a scale A on every head for several epochs with an L1 penalty and ranks heads
by ‖A‖₂. This selector instead runs the training data through the model once, at A = 0 (the base model
itself), and ranks head (l, i) by the norm of the gradient of the dataset-mean task loss with respect
to A_l^i:

    score(l, i) = ‖∂L/∂A_l^i‖₂ at A = 0,   L = Σ_batches loss_sum / Σ_batches units

which is ‖Σ_b g_b‖₂ with each batch's gradient weighted by its share of the units (scored tokens for
SFT, pairs for DPO), so the score does not depend on the batch size. Why this norm and not the mean of
the per-batch squared norms (a Fisher-style score, kept in the metadata as `"fisher_scores"`): L1
training moves an element of A away from 0 only while the gradient pushes it the same way over many
steps and beats λ; gradient components whose sign flips from batch to batch cancel in Σ_b g_b, as they
do in training, but add up in Σ_b ‖g_b‖². The norm of the summed gradient is the first-order loss
decrease per unit step of the steepest scale edit on that head.

A third score from the same pass, `"adam_scores"` in the metadata, models what step 1's optimiser does:
Adam moves each element by about lr · E[g] / √E[g²] per step, and the L1 penalty takes λ off |E[g]|, so

    adam(l, i) = ‖ max(0, |ḡ_e| − λ) / √(mean_b m_be²) ‖₂ over the elements e of A_l^i

with ḡ the dataset-mean gradient, m_b a batch's mean-loss gradient and λ = `config.l1`. The pass
groups records of similar length into its batches (least padding); ḡ does not depend on the grouping,
the per-batch scores (Fisher, Adam) do.

At A = 0 the adapted model is the base model, so for DPO the frozen reference log-probs equal the
policy's: the reference pass that DPO training needs is skipped (the loss is evaluated with the
policy's own detached log-probs as reference, which is exact here). Cost: one forward and one backward
pass over the records, against `epochs` of them (plus a reference pass for DPO) for L1 selection.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters.base_state import preserved_base_model
from ..adapters.config import LofitConfig
from ..adapters.model import LofitModel, get_lofit_model
from ..errors import LofitRuntimeError
from ..training.encoding import Example, max_positions
from ..training.logprobs import TokenScorer, sequence_logps
from ..training.losses import DPOObjective, Objective, dpo_losses, encode_train_val
from ..training.settings import TrainingConfig
from .selectors import SelectionRequest, SelectorScores


def gradient_head_scores(
    base_model: nn.Module,
    tokenizer: Any,
    records: Sequence[dict[str, str]],
    objective: str,
    config: TrainingConfig,
    target_modules: list[str] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Score every head by the norm of the task-loss gradient w.r.t. its scale at A = 0, in one pass.

    Args:
        base_model: a plain causal LM (no LoFiT wrapper); handed back exactly as it came.
        tokenizer: its tokenizer.
        records: validated training records of `objective` ("sft" or "dpo").
        objective: "sft" or "dpo".
        config: uses `batch_size`, `max_length`, `beta`, `precision`; `epochs`, `lr` and `l1` do not apply.
        target_modules: name suffixes of the attention output projections, if not found automatically.

    Returns:
        (scores [num_layers, num_heads] fp32, metadata) where metadata holds `"fisher_scores"` (the mean
        over batches of ‖g_b‖², same shape, as nested lists), `"adam_scores"` (see the module docstring),
        `"passes": 1`, the batch count and the wall time.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from lofit.training import TrainingConfig
        >>> from tiny_models import tiny_tokenizer
        >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
        >>> records = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6"}]
        >>> scores, info = gradient_head_scores(base, tiny_tokenizer(), records, "sft", TrainingConfig())
        >>> tuple(scores.shape), info["passes"]
        ((2, 4), 1)
    """
    started = time.perf_counter()
    task, examples, _ = encode_train_val(
        objective, tokenizer, records, None, config.max_length, config.beta, max_positions(base_model)
    )
    with _handed_back(base_model):
        adapter = LofitConfig(use_scale=True, use_offset=False, init_std=0.0, target_modules=target_modules)
        model = get_lofit_model(base_model, adapter)
        try:
            total, fisher, adam, num_batches = _accumulate_gradients(model, task, examples, config)
        finally:
            model.unload()
    return total, {
        "fisher_scores": fisher.tolist(),
        "adam_scores": adam.tolist(),
        "adam_l1": config.l1,
        "passes": 1,
        "num_batches": num_batches,
        "wall_s": time.perf_counter() - started,
        "gradient_precision": config.precision,
    }


def gradient_pass(request: SelectionRequest) -> tuple[torch.Tensor, dict[str, Any]]:
    """The one gradient pass both gradient selectors read; its details go to `request.metadata`."""
    with preserved_base_model(request.base_model):
        scores, info = gradient_head_scores(
            request.base_model,
            request.tokenizer,
            request.records,
            request.objective,
            request.config,
            request.target_modules,
        )
    request.metadata["gradient"] = info
    return scores, info


def select(request: SelectionRequest) -> SelectorScores:
    """Selector "gradient": scores are ‖∂L/∂A‖₂ at A = 0 per head; the pass's details go to metadata."""
    return SelectorScores(gradient_pass(request)[0])


@contextlib.contextmanager
def _handed_back(model: nn.Module) -> Iterator[None]:
    """Restore `model`'s requires_grad flags and train/eval mode when the block ends."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    training = model.training
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(training)


def _accumulate_gradients(
    model: LofitModel, task: Objective, examples: list[Example], config: TrainingConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(‖Σ_b g_b‖₂, mean_b ‖g_b‖², the Adam-like score, number of batches), each [num_layers, num_heads]."""
    geometry = model.geometry
    vectors = model.adapter_vectors()
    layers = sorted(vectors)
    scales = [vectors[layer].scale for layer in layers]
    assert all(scale is not None for scale in scales)
    summed = [torch.zeros_like(scale) for scale in scales]  # type: ignore[arg-type]
    squares = [torch.zeros_like(scale) for scale in scales]  # type: ignore[arg-type]  # Σ_b m_b² per element
    fisher = torch.zeros(geometry.num_layers, geometry.num_heads)
    device = model.get_base_model().get_input_embeddings().weight.device  # type: ignore[operator]
    scorer = TokenScorer(model)
    loss_scale = 2.0**12 if config.precision == "fp16" else 1.0  # fp16 gradients underflow unscaled
    total_units = sum(task.units(example) for example in examples)
    model.eval()  # no dropout: the gradient of the network that step 2 will train
    # The summed gradient does not depend on how records are grouped: batches of similar length pad least.
    ordered = sorted(examples, key=lambda e: max(len(s.input_ids) for s in e.sequences))
    batches = [ordered[i : i + config.batch_size] for i in range(0, len(ordered), config.batch_size)]
    bar = tqdm(batches, desc="gradient head scores", unit="batch", disable=not config.progress, leave=False)
    for batch in bar:
        with _autocast(config.precision, device):
            loss_sum, units = _loss_sum_at_identity(task, scorer, batch, device)
        raw = torch.autograd.grad(loss_sum * loss_scale, scales)  # type: ignore[arg-type]
        grads = [grad.float() / loss_scale for grad in raw]
        if not all(torch.isfinite(grad).all() for grad in grads):
            raise LofitRuntimeError(
                f"the loss gradient is not finite (precision {config.precision!r}); use precision 'fp32'"
            )
        for index, (layer, grad) in enumerate(zip(layers, grads, strict=True)):
            summed[index] += grad
            squares[index] += (grad / units).square()
            fisher[layer, vectors[layer].heads.cpu()] += (grad / units).norm(dim=-1).square().cpu()
    scores = torch.zeros(geometry.num_layers, geometry.num_heads)
    adam = torch.zeros(geometry.num_layers, geometry.num_heads)
    count = max(len(batches), 1)
    for layer, grad, square in zip(layers, summed, squares, strict=True):
        heads = vectors[layer].heads.cpu()
        mean = grad / total_units
        scores[layer, heads] = mean.norm(dim=-1).cpu()
        rate = (mean.abs() - config.l1).clamp(min=0) / (square / count).sqrt().clamp(min=1e-30)
        adam[layer, heads] = rate.norm(dim=-1).cpu()
    return scores, fisher / count, adam, len(batches)


def _loss_sum_at_identity(
    task: Objective, scorer: TokenScorer, batch: Sequence[Example], device: torch.device
) -> tuple[torch.Tensor, int]:
    """The batch's summed task loss and its unit count, with the adapter at the identity (A = 0)."""
    if not isinstance(task, DPOObjective):
        out = task.loss(scorer, batch, device)
        return out.loss_sum, out.units
    # At A = 0 the policy is the frozen reference: its detached log-probs are the reference log-probs.
    tokens = task.batch(batch).to(device)
    policy = sequence_logps(scorer(tokens), tokens).view(len(batch), 2)
    reference = policy.detach()
    losses = dpo_losses(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], task.beta)
    return losses.sum(), len(batch)


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
