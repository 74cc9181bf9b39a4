"""One optimizer step: micro-batches forward/backward, the gradient all-reduce, clipping, AdamW.

Every micro-batch's summed loss is divided by the global batch's unit count (scored tokens for SFT,
pairs for DPO), so grad_accum and the number of processes do not change the update.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from ..errors import LofitRuntimeError
from .attention_kernel import attention_kernel
from .batching import split_micro_batches
from .distributed import all_reduce_gradients, clip_gradients, reduce_sum
from .encoding import Example
from .run_state import LoopState, TrainingRun


class NonFiniteLossError(LofitRuntimeError):
    """Training produced a NaN/inf loss or gradient; the message says what to change."""


def optimizer_step(run: TrainingRun, state: LoopState, examples: list[Example], epoch: int) -> dict[str, Any]:
    """Forward/backward over this process's micro-batches, all-reduce, clip, AdamW; the step's record."""
    config, accelerator = run.config, run.accelerator
    step_started = time.perf_counter()
    total_units = sum(run.objective.units(e) for e in examples)
    lr = run.scheduler.get_last_lr()[0]
    totals, metric_sums = _accumulate_gradients(run, state, examples, total_units, epoch)
    penalty = _backward_penalty(run)
    if run.world > 1:
        all_reduce_gradients(accelerator, run.params)
    totals = reduce_sum(accelerator, totals, run.device)
    grad_norm = clip_gradients(accelerator, run.params, config.max_grad_norm)
    if not math.isfinite(grad_norm) and config.precision != "fp16":
        raise _non_finite(
            run,
            state,
            "gradient norm",
            grad_norm,
            epoch,
            f"Lower lr (now {config.lr:g}) or use precision 'fp32'",
        )
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    tokens = sum(e.num_tokens for e in examples)
    seconds = time.perf_counter() - step_started
    record: dict[str, Any] = {
        "step": state.step + 1,
        "epoch": epoch,
        "loss": float(totals[0] / max(float(totals[1]), 1.0)),
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": tokens,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "step_s": seconds,
        "elapsed_s": time.perf_counter() - state.started,
    }
    if penalty is not None:
        record.update(penalty=penalty, total_loss=record["loss"] + penalty)
    if run.world == 1:  # metric sums are per process; report them only where they are complete
        record.update({k: v / max(total_units, 1) for k, v in metric_sums.items()})
    return record


def _accumulate_gradients(
    run: TrainingRun, state: LoopState, examples: list[Example], total_units: int, epoch: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """Backpropagate this process's micro-batches; return (task-loss sum, unit count) and metric sums."""
    config, accelerator = run.config, run.accelerator
    totals = torch.zeros(2, dtype=torch.float64)
    metric_sums: dict[str, float] = {}
    for micro, real in _micro_batches(run, examples):
        longest = max(len(sequence.input_ids) for example in micro for sequence in example.sequences)
        # the same kernel in the backward: activation checkpointing recomputes the forward there
        with attention_kernel(run.device, longest):
            with accelerator.autocast():
                out = run.objective.loss(run.scorer, micro, run.device)
            if not real:  # FSDP: a stand-in pass so that every process joins the same collectives
                accelerator.backward(out.loss_sum * 0.0)
                continue
            value = float(out.loss_sum.detach())
            if not math.isfinite(value):
                advice = (
                    f"Lower lr (now {config.lr:g}), use precision 'fp32' or 'bf16' instead of 'fp16', "
                    "or check the model and data"
                )
                raise _non_finite(run, state, "loss", value, epoch, advice)
            accelerator.backward(out.loss_sum * (run.world / total_units))
        totals += torch.tensor([value, out.units], dtype=torch.float64)
        for key, metric in out.metric_sums.items():
            metric_sums[key] = metric_sums.get(key, 0.0) + metric
    return totals, metric_sums


def _micro_batches(run: TrainingRun, examples: list[Example]) -> list[tuple[list[Example], bool]]:
    """This process's share of the batch as micro-batches, each flagged real or stand-in.

    Under FSDP every forward gathers the sharded layers from all processes, so each process runs as many
    micro-batches as the busiest one; the extra ones repeat a record and contribute zero gradient.
    """
    split = run.config.grad_accum
    own = [(micro, True) for micro in split_micro_batches(examples[run.rank :: run.world], split)]
    if not run.fsdp:
        return own
    most = max(len(split_micro_batches(examples[r :: run.world], split)) for r in range(run.world))
    return own + [([examples[0]], False)] * (most - len(own))


def _backward_penalty(run: TrainingRun) -> float | None:
    """Backpropagate the regularizer (once per step, on every process); its value, or None without one."""
    if run.regularizer is None:
        return None
    term = run.regularizer()
    run.accelerator.backward(term)
    return float(term.detach())


def _non_finite(
    run: TrainingRun, state: LoopState, what: str, value: float, epoch: int, advice: str
) -> NonFiniteLossError:
    last = state.last_checkpoint
    kept = f" The last good checkpoint ({last.name}) is kept in {last.parent}." if last is not None else ""
    return NonFiniteLossError(
        f"{run.description}: the {what} became {value} at step {state.step + 1} (epoch {epoch}); training "
        f"stopped. {advice}.{kept}"
    )
