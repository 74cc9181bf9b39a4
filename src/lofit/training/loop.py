"""`train_adapter`: the one training loop, on `accelerate`, used by head selection and offset tuning.

`batch_size` is the number of records per optimizer step over all processes together; `grad_accum`
splits each process's share into that many micro-batches. Every micro-batch's summed loss is divided by
the global batch's unit count (scored tokens for SFT, pairs for DPO), so grad_accum and the number of
processes are pure memory/speed knobs. With `checkpoint_every` the loop saves its whole state (see
`lofit.training.checkpoints`) every N optimizer steps and at each epoch end; `resume=True` continues
from the latest checkpoint exactly where it stopped.

Reading order: `train_adapter` -> `_setup` (a `TrainingRun`: what stays fixed) -> `_start` (a
`LoopState`: what moves) -> `_prepared` (eval mode, activation checkpointing, FSDP) -> `_train_epoch`
-> `step.optimizer_step` -> `_after_step`; `_validate`, `_checkpoint` and `_finish` are called from
there. No function shares state with another except through those two objects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import LofitValueError
from ..io.atomic import atomic_write_text
from . import activation_checkpointing
from .batching import epoch_batches
from .checkpoints import LoopPosition, save_checkpoint
from .distributed import make_accelerator, place_model, reduce_sum
from .encoding import Example
from .fsdp import check_weights_loaded, fsdp_requested, parameter_bytes, shard_base_model, unshard_base_model
from .history import TrainingHistory
from .logprobs import TokenScorer
from .losses import Objective, loss_sums, sums_to_means
from .lower_layers import MAX_CACHE_BYTES, LowerLayerCache, cache_bytes, check_cache_fits
from .resume import run_identity, start_position
from .run_state import LoopState, TrainingRun
from .settings import TrainingConfig
from .step import optimizer_step
from .trainable import TrainableAdapter, causal_lm_of

if TYPE_CHECKING:
    pass

LOG_NAME = "train_log.jsonl"
CURVE_NAME = "loss_curve.png"
LOG_EVERY_S = 30.0  # besides each epoch end, rewrite the (atomic) log at most this often

logger = logging.getLogger(__name__)


def train_adapter(
    model: TrainableAdapter,
    objective: Objective,
    train_examples: Sequence[Example],
    config: TrainingConfig,
    *,
    val_examples: Sequence[Example] | None = None,
    regularizer: Callable[[], torch.Tensor] | None = None,
    description: str = "training",
) -> TrainingHistory:
    """Train the adapter parameters of `model` (those with requires_grad) in place.

    The loss of a step is the objective's batch mean plus `regularizer()` (e.g. λ·Σ|A|). The base model
    runs in eval mode (no dropout), so the reference pass, validation and training see the same network.

    Args:
        model: any `TrainableAdapter`: a `LofitModel`, a `RedModel`, or `AdapterView(peft_model)`.
        objective: the SFT or DPO objective that encoded the examples.
        train_examples: the encoded training records.
        config: the training options.
        val_examples: encoded validation records, scored before training and after each epoch.
        regularizer: a penalty added to every step's loss.
        description: the run's name in logs, the progress bar and checkpoints.

    Returns:
        The `TrainingHistory`; with `config.output_dir` it is also written there as `train_log.jsonl`
        with a `loss_curve.png`.
    """
    run = _setup(model, objective, train_examples, val_examples or [], config, regularizer, description)
    state = _start(run)
    try:
        with _prepared(run, state):
            with run.accelerator.autocast():
                objective.prepare(run.scorer, train_examples, config.validation_batch_size, run.device)
            if state.step == 0:
                _validate(run, 0, 0)
            for epoch in range(state.position.epoch, config.epochs + 1):
                _train_epoch(run, state, epoch)
    finally:
        _finish(run, state)
    if run.output_dir is not None and run.history.steps:
        from .plots import plot_loss_curve

        plot_loss_curve(run.history, run.output_dir / CURVE_NAME, title=description)
    return run.history


def _setup(
    model: TrainableAdapter,
    objective: Objective,
    train_examples: Sequence[Example],
    val_examples: Sequence[Example],
    config: TrainingConfig,
    regularizer: Callable[[], torch.Tensor] | None,
    description: str,
) -> TrainingRun:
    module = _check_model(model)
    accelerator = make_accelerator(config.precision)
    device = place_model(module, accelerator.device)
    params = [p for p in model.adapter_parameters() if p.requires_grad]
    if not params:
        raise LofitValueError(
            "the model has no trainable adapter parameters; build it with get_lofit_model (or pass the "
            "parameters to train through AdapterView)"
        )
    check_sequence_lengths(module, train_examples, val_examples)
    if getattr(accelerator.distributed_type, "value", None) == "DEEPSPEED":
        logger.warning(
            "lofit does not shard the frozen base model under DeepSpeed: every process holds the whole model; "
            "use an FSDP config (accelerate launch --config_file fsdp.yaml) to shard it"
        )
    fsdp = fsdp_requested(accelerator)
    optimizer = accelerator.prepare_optimizer(
        torch.optim.AdamW(
            params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay
        )
    )
    total_steps = math.ceil(len(train_examples) / config.batch_size) * config.epochs
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.optimizer, linear_schedule(total_steps, warmup_steps)
    )
    history = TrainingHistory(
        settings={
            **dataclasses.asdict(config),
            "objective": objective.name,
            "num_train": len(train_examples),
            "num_val": len(val_examples),
            "total_steps": total_steps,
            "warmup_steps": warmup_steps,
            "num_processes": accelerator.num_processes,
            "trainable_params": sum(p.numel() for p in params),
        }
    )
    identity = run_identity(config, objective, description, module, train_examples, params)
    output_dir = Path(config.output_dir) if config.output_dir and accelerator.is_main_process else None
    scorer = TokenScorer(module, mode="full" if fsdp else "auto")
    return TrainingRun(
        module, objective, train_examples, val_examples, config, description, regularizer, accelerator,
        device, params, optimizer, scheduler, scorer, history, identity, fsdp, output_dir,
    )  # fmt: skip


def _check_model(model: TrainableAdapter) -> nn.Module:
    """`model` as the torch module it must be; refuse one whose weights were never loaded."""
    if not isinstance(model, nn.Module):
        raise LofitValueError(
            f"train_adapter needs a torch module with adapter_parameters() and disable_adapter(), got "
            f"{type(model).__name__}; wrap other adapted models in lofit.training.AdapterView"
        )
    check_weights_loaded(model)
    return model


def linear_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to 1, then linear decay to 0 at `total_steps` (as transformers' linear schedule).

    Example:
        >>> factor = linear_schedule(total_steps=10, warmup_steps=2)
        >>> [round(factor(step), 3) for step in (0, 1, 2, 6, 10)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _start(run: TrainingRun) -> LoopState:
    """The loop's starting state: fresh, or restored from the latest checkpoint."""
    config = run.config
    generator = torch.Generator().manual_seed(config.seed)
    restored, found = start_position(
        config, run.identity, run.params, run.optimizer.optimizer, run.scheduler, run.history, run.description
    )
    position = restored or LoopPosition(step=0, epoch=1, batch=0, generator_state=generator.get_state())
    generator.set_state(position.generator_state)
    started = time.perf_counter() - position.elapsed_s
    state = LoopState(position, generator, started, started, last_checkpoint=found)
    from tqdm.auto import tqdm

    state.bar = tqdm(
        total=run.history.settings["total_steps"],
        initial=position.step,
        desc=run.description,
        disable=not (config.progress and run.accelerator.is_main_process),
    )
    return state


@contextlib.contextmanager
def _prepared(run: TrainingRun, state: LoopState) -> Iterator[None]:
    """The model as training needs it (eval mode, activation checkpointing, FSDP); as it was afterwards."""
    model = run.model
    was_training = model.training
    model.eval()
    # transformers checkpoints only in training mode; these wrappers work in eval mode too.
    checkpointed = run.config.gradient_checkpointing or activation_checkpointing.requested(model)
    run.history.settings["gradient_checkpointing"] = checkpointed
    if checkpointed:
        state.switched_layers = activation_checkpointing.enable(
            activation_checkpointing.decoder_layers(model)
        )
    try:
        if run.fsdp:
            full_bytes = parameter_bytes(causal_lm_of(model))
            state.sharded = shard_base_model(model, run.params)
            run.history.settings["fsdp"] = {
                "processes": run.world,
                "parameter_bytes_full": full_bytes,
                "parameter_bytes_local": parameter_bytes(causal_lm_of(model)),
            }
        if run.config.cache_lower_layers:
            state.lower_cache = _lower_layer_cache(run)
        yield
    finally:
        if state.lower_cache is not None:
            state.lower_cache.detach()
        if state.sharded is not None:
            unshard_base_model(state.sharded)
        activation_checkpointing.disable(state.switched_layers)
        model.train(was_training)


def _lower_layer_cache(run: TrainingRun) -> LowerLayerCache | None:
    """The attached cache below the lowest adapted layer; None where nothing lies below it (or FSDP)."""
    selected_heads = getattr(run.model, "selected_heads", None)
    heads = selected_heads() if callable(selected_heads) else {}
    layers = [layer for layer, chosen in heads.items() if chosen]
    if run.fsdp or not layers or min(layers) == 0:
        # under FSDP a skipped layer would leave the other processes waiting in its all-gather
        return None
    causal_lm = causal_lm_of(run.model)
    decoder_layers = activation_checkpointing.decoder_layers(causal_lm)
    config = getattr(causal_lm, "config", None)
    hidden_size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if isinstance(hidden_size, int):
        examples = [*run.train_examples, *run.val_examples]
        needed = cache_bytes(examples, hidden_size)
        if run.config.cache_lower_layers == "auto" and needed > MAX_CACHE_BYTES:
            run.history.settings["lower_layer_cache_off"] = (
                f"'auto': the hidden states would take up to {needed / 2**30:.1f} GiB, "
                f"more than {MAX_CACHE_BYTES / 2**30:.0f} GiB"
            )
            return None
        check_cache_fits(examples, hidden_size)
    get_decoder = getattr(causal_lm, "get_decoder", None)
    body = get_decoder() if callable(get_decoder) else causal_lm
    if not any(module is decoder_layers[0] for module in body.modules()):
        body = causal_lm
    cache = LowerLayerCache(body, decoder_layers, min(layers))
    cache.attach()
    return cache


def _train_epoch(run: TrainingRun, state: LoopState, epoch: int) -> None:
    """One pass over the training examples (the part done before a resumed checkpoint is skipped)."""
    config = run.config
    epoch_generator_state = state.generator.get_state()
    lengths = [e.num_tokens for e in run.train_examples]
    batches = epoch_batches(lengths, config.batch_size, state.generator, config.group_by_length)
    skip = state.position.batch if epoch == state.position.epoch else 0
    for batch_number in range(skip, len(batches)):
        examples = [run.train_examples[i] for i in batches[batch_number]]
        record = optimizer_step(run, state, examples, epoch)
        # The epoch's last step is saved after its validation, by the epoch-end checkpoint.
        mid_epoch = batch_number + 1 < len(batches)
        _after_step(run, state, record)
        if config.checkpoint_every and state.step % config.checkpoint_every == 0 and mid_epoch:
            _checkpoint(run, state, epoch, batch_number + 1, epoch_generator_state)
    _validate(run, epoch, state.step)
    if run.output_dir is not None:
        atomic_write_text(run.output_dir / LOG_NAME, run.history.to_jsonl())
    if config.checkpoint_every:
        _checkpoint(run, state, epoch + 1, 0, state.generator.get_state())


def _after_step(run: TrainingRun, state: LoopState, record: dict[str, Any]) -> None:
    """Count the step, log it, and rewrite the log file when it is due."""
    state.position.step = record["step"]
    state.position.tokens_seen += record["tokens"]
    run.history.steps.append(record)
    if run.output_dir is not None and time.perf_counter() - state.last_write > LOG_EVERY_S:
        atomic_write_text(run.output_dir / LOG_NAME, run.history.to_jsonl())
        state.last_write = time.perf_counter()
    state.bar.update(1)
    state.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")


def _validate(run: TrainingRun, epoch: int, step: int) -> None:
    """Score the validation examples (each process its share, summed over processes) into the history."""
    if not run.val_examples:
        return
    # Under FSDP every process scores all records: the sharded layers need every process in every forward.
    shard = list(run.val_examples) if run.fsdp else list(run.val_examples)[run.rank :: run.world]
    with run.accelerator.autocast():
        sums = loss_sums(run.objective, run.scorer, shard, run.config.validation_batch_size, run.device)
    if run.world > 1 and not run.fsdp:
        keys = sorted(sums)
        reduced = reduce_sum(run.accelerator, torch.tensor([sums[k] for k in keys]), run.device)
        sums = dict(zip(keys, reduced.tolist(), strict=True))
    means = sums_to_means(sums)
    run.history.validation.append({"epoch": epoch, "step": step, **{f"val_{k}": v for k, v in means.items()}})


def _checkpoint(
    run: TrainingRun, state: LoopState, epoch: int, batch: int, generator_state: torch.Tensor
) -> None:
    """Save the run's whole state (main process only), to continue with `batch` of `epoch`."""
    root = run.config.checkpoints_path
    if root is None or not run.accelerator.is_main_process:
        return
    position = state.position
    here = LoopPosition(
        position.step,
        epoch,
        batch,
        generator_state,
        position.tokens_seen,
        time.perf_counter() - state.started,
    )
    state.last_checkpoint = save_checkpoint(
        root,
        here,
        params=run.params,
        optimizer=run.optimizer.optimizer,
        scheduler=run.scheduler,
        identity=run.identity,
        history=run.history.to_dict(),
    )


def _finish(run: TrainingRun, state: LoopState) -> None:
    """Close the bar, write the summary and the final log (also when training stopped with an error)."""
    state.bar.close()
    elapsed = time.perf_counter() - state.started
    tokens = state.position.tokens_seen
    run.history.summary = {
        "steps": state.step,
        "elapsed_s": elapsed,
        "tokens": tokens,
        "tokens_per_s": tokens / max(elapsed, 1e-9),
        "logits": run.scorer.mode,
        "device": str(run.device),
    }
    cache = state.lower_cache
    if cache is not None:
        run.history.summary["lower_layer_cache"] = {
            "layer": cache.lowest,
            "sequences": len(cache.states),
            "bytes": cache.num_bytes,
            "replayed_forwards": cache.replayed_forwards,
        }
    if run.output_dir is not None:
        atomic_write_text(run.output_dir / LOG_NAME, run.history.to_jsonl())


def check_sequence_lengths(
    model: nn.Module, train_examples: Sequence[Example], val_examples: Sequence[Example] | None
) -> None:
    """Refuse sequences longer than the model's position limit.

    A clear `LofitValueError` naming the record and `max_length`, instead of an index error deep inside
    the model or silently wrong positions.
    """
    config = getattr(causal_lm_of(model), "config", None)
    limit = next(
        (
            value
            for key in ("max_position_embeddings", "n_positions")
            if isinstance(value := getattr(config, key, None), int) and value > 0
        ),
        None,
    )
    if limit is None:
        return
    for name, examples in (("train", train_examples), ("validation", val_examples or [])):
        for example in examples:
            longest = max(len(s.input_ids) for s in example.sequences)
            if longest > limit:
                raise LofitValueError(
                    f"{name} record {example.index} is {longest} tokens long, more than the {limit} positions "
                    f"this model accepts; pass max_length (--max-length) <= {limit} to truncate prompts from "
                    "the left, or shorten the record"
                )
