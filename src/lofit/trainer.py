"""The one training loop, on `accelerate`, used by head selection and offset tuning.

`batch_size` is the number of records per optimizer step over all processes together; `grad_accum`
splits each process's share into that many micro-batches. Every micro-batch's summed loss is divided by
the global batch's unit count (scored tokens for SFT, pairs for DPO), so the update does not depend on
how the batch is split: grad_accum and the number of GPUs are pure memory/speed knobs. The adapter's
gradients are tiny, so they are averaged across processes with one all-reduce per step instead of
wrapping the (frozen) base model in DistributedDataParallel. `accelerate launch` runs it unchanged.

With `checkpoint_every` the loop saves its whole state (see `lofit.checkpoint`) every N optimizer steps
and at each epoch end; `resume=True` continues from the latest checkpoint exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import layer_checkpointing
from .atomic import atomic_write_text
from .checkpoint import LoopPosition, latest_checkpoint, load_checkpoint, save_checkpoint
from .errors import LofitRuntimeError
from .model import LofitModel
from .objectives import Example, Objective, TokenScorer, loss_sums, sums_to_means

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
LOG_NAME = "train_log.jsonl"
# CPUs whose bf16 matmuls beat fp32 (2.6x measured, see benchmarks/results/speed.md)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CURVE_NAME = "loss_curve.png"
LOG_EVERY_S = 30.0  # besides each epoch end, rewrite the (atomic) log at most this often
CHECKPOINT_SUBDIR = "checkpoints"
# Options that decide the trained values: a checkpoint resumes only a run that agrees on all of them.
# grad_accum and the number of processes are left out on purpose (they do not change the result).
RESULT_OPTIONS = (
    "epochs", "batch_size", "lr", "l1", "beta", "weight_decay", "max_length", "seed",
    "warmup_ratio", "max_grad_norm", "precision", "init_std", "group_by_length",
)  # fmt: skip

logger = logging.getLogger(__name__)


class NonFiniteLossError(LofitRuntimeError):
    """Training produced a NaN/inf loss or gradient; the message says what to change."""


@dataclass
class TrainingConfig:
    """Training options understood by `select_heads` and `train_offsets` (defaults: METHOD.md §5)."""

    epochs: int = field(default=5, metadata={"help": "passes over the training records"})
    batch_size: int = field(default=8, metadata={"help": "records per optimizer step (all processes)"})
    lr: float = field(default=1e-2, metadata={"help": "peak AdamW learning rate"})
    l1: float = field(default=0.0, metadata={"help": "λ of the L1 penalty on the scales (selection)"})
    beta: float = field(default=0.5, metadata={"help": "DPO temperature β"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (paper: 0.01)"})
    max_length: int | None = field(default=None, metadata={"help": "truncate sequences to this many tokens"})
    seed: int = field(default=42, metadata={"help": "seed of the adapter init and the data order"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of steps with linear warm-up"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    precision: str = field(
        default="fp32",
        metadata={"help": "fp32, bf16 or fp16 (mixed, via accelerate); auto = bf16 where it is fast"},
    )
    init_std: float = field(default=1e-3, metadata={"help": "std of the N(0, σ) adapter init"})
    group_by_length: bool = field(default=False, metadata={"help": "batch records of similar length"})
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute decoder-layer activations in backward: less memory, slower steps"},
    )
    eval_batch_size: int | None = field(default=None, metadata={"help": "validation batch (default 2x)"})
    output_dir: str | None = field(default=None, metadata={"help": "write train_log.jsonl, loss_curve.png"})
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})
    checkpoint_every: int = field(
        default=0, metadata={"help": "save a checkpoint every N steps and at each epoch end (0 = off)"}
    )
    checkpoint_dir: str | None = field(
        default=None, metadata={"help": "where checkpoints go (default: output_dir/checkpoints)"}
    )
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint, if any"})

    def __post_init__(self) -> None:
        positive_ints = ("epochs", "batch_size", "grad_accum", "seed", "checkpoint_every")
        for name in positive_ints:
            value = getattr(self, name)
            least = 0 if name in ("seed", "checkpoint_every") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        for name in ("lr", "l1", "weight_decay", "max_grad_norm", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
            setattr(self, name, float(value))
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1):
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.precision == "auto":
            self.precision = fastest_precision()
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be 'auto' or one of {sorted(PRECISIONS)}, got {self.precision!r}"
            )
        for name in ("max_length", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if (self.checkpoint_every or self.resume) and self.checkpoints_path is None:
            raise ValueError(
                "checkpoint_every and resume need output_dir or checkpoint_dir to keep checkpoints in"
            )

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any], *, owner: str, **defaults: Any) -> TrainingConfig:
        """Build from user keyword arguments over `defaults`; unknown names raise a TypeError listing the known."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise TypeError(f"{owner}() got unknown training option(s) {unknown}; known options: {known}")
        return cls(**{**defaults, **kwargs})

    @property
    def validation_batch_size(self) -> int:
        return self.eval_batch_size or 2 * self.batch_size

    @property
    def checkpoints_path(self) -> Path | None:
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        return Path(self.output_dir) / CHECKPOINT_SUBDIR if self.output_dir else None


@dataclass
class TrainingHistory:
    """What a run did: one record per optimizer step, one per validation, and the settings."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def losses(self) -> list[float]:
        return [record["loss"] for record in self.steps]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingHistory:
        return cls(
            list(data.get("steps", [])),
            list(data.get("validation", [])),
            dict(data.get("settings", {})),
            dict(data.get("summary", {})),
        )

    def to_jsonl(self) -> str:
        records = [{"kind": "step", **r} for r in self.steps] + [
            {"kind": "val", **r} for r in self.validation
        ]
        records.sort(key=lambda r: (r["step"], r["kind"] == "val"))  # a step, then the validation after it
        return "".join(json.dumps(r) + "\n" for r in records)

    def plot(self, path: str | Path, title: str | None = None) -> None:
        from .plotting import plot_loss_curve

        plot_loss_curve(self, path, title=title)


# ------------------------------------------------------------------------------------- helpers
def fastest_precision() -> str:
    """ "bf16" where bf16 autocast is fast (CUDA with bf16, or a CPU with bf16 matmul instructions), else "fp32"."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return "fp32"
    return "bf16" if any(flag in flags for flag in BF16_CPU_FLAGS) else "fp32"


def make_accelerator(precision: str) -> Any:
    """An Accelerator with this mixed precision (re-creating accelerate's process-wide state if needed)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed = PRECISIONS[precision]
    try:
        return Accelerator(mixed_precision=mixed)
    except ValueError as error:
        # accelerate keeps one process-wide state; selection in fp32 then tuning in bf16 must still work.
        if "already been initialized" not in str(error):
            raise
        AcceleratorState._reset_state()
        return Accelerator(mixed_precision=mixed)


def seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)


def place_model(model: LofitModel, device: torch.device) -> torch.device:
    """Move the model to `device` unless it is placed already (a device map or bitsandbytes quantisation,
    whose models refuse `.to`); return the device its inputs go to."""
    placed = isinstance(getattr(model.get_base_model(), "hf_device_map", None), dict) or getattr(
        model.get_base_model(), "is_quantized", False
    )
    current = next(model.parameters()).device
    same = current.type == device.type and (
        None in (current.index, device.index) or current.index == device.index
    )
    if not placed and not same:
        model.to(device)
    embeddings = model.get_base_model().get_input_embeddings()  # type: ignore[operator]
    return embeddings.weight.device if embeddings is not None else device


def epoch_batches(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator, group_by_length: bool
) -> list[list[int]]:
    """Shuffled record indices cut into batches; optionally sorted by length within chunks of 50 batches."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    chunk = 50 * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start : start + chunk], key=lambda i: -lengths[i])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def linear_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to 1, then linear decay to 0 at `total_steps` (as transformers' linear schedule)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def split_micro_batches(examples: list[Example], parts: int) -> list[list[Example]]:
    size = max(1, math.ceil(len(examples) / parts))
    return [examples[i : i + size] for i in range(0, len(examples), size)]


# ------------------------------------------------------------------------------------ the loop
def train_adapter(
    model: LofitModel,
    objective: Objective,
    train_examples: Sequence[Example],
    config: TrainingConfig,
    *,
    val_examples: Sequence[Example] | None = None,
    regularizer: Callable[[], torch.Tensor] | None = None,
    description: str = "training",
) -> TrainingHistory:
    """Train the active adapter's trainable vectors of `model` in place; return the history.

    The loss of a step is the objective's batch mean plus `regularizer()` (e.g. λ·Σ|A|). The base model
    runs in eval mode (no dropout), so the reference pass, validation and training see the same network.
    """
    accelerator = make_accelerator(config.precision)
    device = place_model(model, accelerator.device)
    rank, world = accelerator.process_index, accelerator.num_processes
    if getattr(accelerator.distributed_type, "value", None) in ("FSDP", "DEEPSPEED"):
        logger.warning(
            "lofit trains data-parallel and does not shard the frozen base model: under this %s launch every "
            "process still holds the whole model. For a model that does not fit one GPU, use "
            "device_map='auto' or quantization='4bit' in one process",
            accelerator.distributed_type,
        )
    params = [p for p in model.adapter_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable adapter parameters; was it built with get_lofit_model?")
    check_sequence_lengths(model, train_examples, val_examples)
    scorer = TokenScorer(model)
    optimizer = accelerator.prepare_optimizer(
        torch.optim.AdamW(
            params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay
        )
    )
    steps_per_epoch = math.ceil(len(train_examples) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.optimizer, linear_schedule(total_steps, warmup_steps)
    )
    history = TrainingHistory(
        settings={
            **dataclasses.asdict(config),
            "objective": objective.name,
            "num_train": len(train_examples),
            "num_val": len(val_examples or []),
            "total_steps": total_steps,
            "warmup_steps": warmup_steps,
            "num_processes": world,
            "trainable_params": sum(p.numel() for p in params),
        }
    )
    output_dir = Path(config.output_dir) if config.output_dir and accelerator.is_main_process else None
    was_training = model.training
    model.eval()
    # transformers checkpoints only in training mode; these wrappers work in eval mode too.
    checkpointed = config.gradient_checkpointing or layer_checkpointing.requested(model)
    layers = layer_checkpointing.decoder_layers(model) if checkpointed else []
    history.settings["gradient_checkpointing"] = checkpointed
    generator = torch.Generator().manual_seed(config.seed)
    lengths = [e.num_tokens for e in train_examples]

    # Checkpoints: only the main process writes; every process reads the same one to resume.
    checkpoint_root = config.checkpoints_path
    identity = run_identity(config, objective, description, model, train_examples, params)
    position = LoopPosition(step=0, epoch=1, batch=0, generator_state=generator.get_state())
    last_checkpoint: Path | None = None
    found = latest_checkpoint(checkpoint_root) if checkpoint_root is not None else None
    if config.resume and found is not None:
        checkpoint = load_checkpoint(found)
        position = checkpoint.restore(identity, params, optimizer.optimizer, scheduler)
        generator.set_state(position.generator_state)
        restored = TrainingHistory.from_dict(checkpoint.history)
        history.steps, history.validation = restored.steps, restored.validation
        history.settings["resumed_from_step"] = position.step
        last_checkpoint = found
        logger.info("%s: resuming from %s (step %d)", description, found, position.step)
    elif config.resume:
        logger.warning(
            "%s: resume asked for, but %s holds no checkpoint; starting afresh", description, checkpoint_root
        )
    elif found is not None and config.checkpoint_every:
        raise ValueError(
            f"{checkpoint_root} holds checkpoints of an earlier run (latest: {found.name}); pass resume=True "
            "(--resume) to continue it, or delete that directory to start afresh"
        )
    started = last_write = time.perf_counter() - position.elapsed_s
    tokens_seen = position.tokens_seen

    def checkpoint_now(epoch: int, batch: int, epoch_generator_state: torch.Tensor) -> None:
        nonlocal last_checkpoint
        if checkpoint_root is None or not accelerator.is_main_process:
            return
        here = LoopPosition(
            step, epoch, batch, epoch_generator_state, tokens_seen, time.perf_counter() - started
        )
        last_checkpoint = save_checkpoint(
            checkpoint_root,
            here,
            params=params,
            optimizer=optimizer.optimizer,
            scheduler=scheduler,
            identity=identity,
            history=history.to_dict(),
        )

    def stop(what: str, value: float, epoch: int, advice: str) -> NonFiniteLossError:
        kept = (
            f" The last good checkpoint ({last_checkpoint.name}) is kept in {last_checkpoint.parent}."
            if last_checkpoint is not None
            else ""
        )
        return NonFiniteLossError(
            f"{description}: the {what} became {value} at step {step + 1} (epoch {epoch}); training "
            f"stopped. {advice}.{kept}"
        )

    def validate(epoch: int, step: int) -> None:
        if not val_examples:
            return
        with accelerator.autocast():
            sums = loss_sums(
                objective, scorer, list(val_examples)[rank::world], config.validation_batch_size, device
            )
        if world > 1:
            keys = sorted(sums)
            reduced = accelerator.reduce(torch.tensor([sums[k] for k in keys], device=device), "sum")
            sums = dict(zip(keys, reduced.tolist(), strict=True))
        means = sums_to_means(sums)
        history.validation.append({"epoch": epoch, "step": step, **{f"val_{k}": v for k, v in means.items()}})

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=position.step,
        desc=description,
        disable=not (config.progress and accelerator.is_main_process),
    )
    step = position.step
    layers = layer_checkpointing.enable(layers)
    try:
        with accelerator.autocast():
            objective.prepare(scorer, train_examples, config.validation_batch_size, device)
        if step == 0:
            validate(0, 0)
        for epoch in range(position.epoch, config.epochs + 1):
            epoch_generator_state = generator.get_state()
            batches = epoch_batches(lengths, config.batch_size, generator, config.group_by_length)
            skip = position.batch if epoch == position.epoch else 0
            for batch_number, batch_indices in enumerate(batches):
                if batch_number < skip:
                    continue  # done before the checkpoint this run resumed from
                step_started = time.perf_counter()
                examples = [train_examples[i] for i in batch_indices]
                total_units = sum(objective.units(e) for e in examples)
                lr = scheduler.get_last_lr()[0]
                totals = torch.zeros(2, dtype=torch.float64)  # task-loss sum, its unit count
                metric_sums: dict[str, float] = {}
                for micro in split_micro_batches(examples[rank::world], config.grad_accum):
                    with accelerator.autocast():
                        out = objective.loss(scorer, micro, device)
                    value = float(out.loss_sum.detach())
                    if not math.isfinite(value):
                        raise stop(
                            "loss",
                            value,
                            epoch,
                            f"Lower lr (now {config.lr:g}), use precision 'fp32' or 'bf16' instead of 'fp16', "
                            "or check the model and data",
                        )
                    accelerator.backward(out.loss_sum * (world / total_units))
                    totals += torch.tensor([value, out.units], dtype=torch.float64)
                    for key, metric in out.metric_sums.items():
                        metric_sums[key] = metric_sums.get(key, 0.0) + metric
                penalty = 0.0
                if regularizer is not None:
                    term = regularizer()
                    accelerator.backward(term)
                    penalty = float(term.detach())
                if world > 1:
                    _all_reduce_gradients(accelerator, params)
                    totals = accelerator.reduce(totals.to(device), "sum").cpu()
                grad_norm = _clip(accelerator, params, config.max_grad_norm)
                if not math.isfinite(grad_norm) and config.precision != "fp16":
                    raise stop(
                        "gradient norm",
                        grad_norm,
                        epoch,
                        f"Lower lr (now {config.lr:g}) or use precision 'fp32'",
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens = sum(e.num_tokens for e in examples)
                tokens_seen += tokens
                seconds = time.perf_counter() - step_started
                record: dict[str, Any] = {
                    "step": step,
                    "epoch": epoch,
                    "loss": float(totals[0] / max(float(totals[1]), 1.0)),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": tokens,
                    "tokens_per_s": tokens / max(seconds, 1e-9),
                    "step_s": seconds,
                    "elapsed_s": time.perf_counter() - started,
                }
                if regularizer is not None:
                    record["penalty"] = penalty
                    record["total_loss"] = record["loss"] + penalty
                if world == 1:  # metric sums are per process; report them only where they are complete
                    record.update({k: v / max(total_units, 1) for k, v in metric_sums.items()})
                history.steps.append(record)
                if output_dir is not None and time.perf_counter() - last_write > LOG_EVERY_S:
                    atomic_write_text(output_dir / LOG_NAME, history.to_jsonl())
                    last_write = time.perf_counter()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                # The epoch's last step is saved after its validation, by the epoch-end checkpoint.
                mid_epoch = batch_number + 1 < len(batches)
                if config.checkpoint_every and step % config.checkpoint_every == 0 and mid_epoch:
                    checkpoint_now(epoch, batch_number + 1, epoch_generator_state)
            validate(epoch, step)
            if output_dir is not None:
                atomic_write_text(output_dir / LOG_NAME, history.to_jsonl())
            if config.checkpoint_every:
                checkpoint_now(epoch + 1, 0, generator.get_state())
    finally:
        bar.close()
        layer_checkpointing.disable(layers)
        model.train(was_training)
        elapsed = time.perf_counter() - started
        history.summary = {
            "steps": step,
            "elapsed_s": elapsed,
            "tokens": tokens_seen,
            "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
            "logits": scorer.mode,
            "device": str(device),
        }
        if output_dir is not None:
            atomic_write_text(output_dir / LOG_NAME, history.to_jsonl())
    if output_dir is not None and history.steps:
        history.plot(output_dir / CURVE_NAME, title=description)
    return history


def run_identity(
    config: TrainingConfig,
    objective: Objective,
    description: str,
    model: LofitModel,
    examples: Sequence[Example],
    params: Sequence[nn.Parameter],
) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed by this run: options, data, heads, shapes."""
    # Baselines (peft, RED) pass duck-typed models that expose adapter_parameters() only.
    selected_heads = getattr(model, "selected_heads", dict)
    digest = hashlib.sha256()
    for example in examples:
        for sequence in example.sequences:
            digest.update(json.dumps([sequence.response_start, *sequence.input_ids]).encode())
    return {
        "description": description,
        "objective": objective.name,
        **{name: getattr(config, name) for name in RESULT_OPTIONS},
        "num_train": len(examples),
        "train_data_sha256": digest.hexdigest(),
        "heads": {str(layer): heads for layer, heads in selected_heads().items()},
        "parameter_shapes": [list(p.shape) for p in params],
    }


def check_sequence_lengths(
    model: LofitModel, train_examples: Sequence[Example], val_examples: Sequence[Example] | None
) -> None:
    """Refuse sequences longer than the model's position limit (a clear error instead of an index error
    deep inside the model, or silently wrong positions)."""
    config = getattr(model.get_base_model(), "config", None)
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
                raise ValueError(
                    f"{name} record {example.index} is {longest} tokens long, more than the {limit} positions "
                    f"this model accepts; pass max_length (--max-length) <= {limit} to truncate prompts from "
                    "the left, or shorten the record"
                )


def _all_reduce_gradients(accelerator: Any, params: list[nn.Parameter]) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), "mean")
    offset = 0
    for param in params:
        param.grad = flat[offset : offset + param.numel()].view_as(param).clone()
        offset += param.numel()


def _clip(accelerator: Any, params: list[nn.Parameter], max_norm: float) -> float:
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    accelerator.unscale_gradients()
    grads = [p.grad.flatten() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads))) if grads else 0.0
