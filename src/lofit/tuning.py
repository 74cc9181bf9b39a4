"""Step 2 of LoFiT: learn offsets v on the selected heads only, starting from the base model."""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import HeadMap, LofitConfig
from .model import LofitModel, get_lofit_model
from .objectives import encode_train_val, train_val_records
from .selection import BaseModelState, HeadSelection, check_plain_model
from .task_defaults import TRAIN_OFFSETS_DEFAULTS
from .trainer import TrainingConfig, seed_everything, train_adapter


def train_offsets(
    base_model: nn.Module,
    tokenizer: Any,
    train_data: Any,
    heads: HeadMap | None,
    objective: str = "sft",
    **train_kwargs: Any,
) -> LofitModel:
    """Train offsets on `heads` ({layer: [head, ...]}, e.g. `selection.top(k)`; None = every head).

    Keyword arguments: `val_data`, `adapter_name` ("default") and the `TrainingConfig` fields (epochs=5,
    batch_size=8, lr=1e-2, beta=0.5, weight_decay=0, max_length, seed=42, grad_accum, warmup_ratio,
    precision, init_std=1e-3, output_dir, progress, ...) and `target_modules` (module-name suffixes of the
    attention output projections, when they are not found automatically). Returns the trained
    `LofitModel` (base frozen); its `training_history` attribute holds the `TrainingHistory`.
    """
    if isinstance(heads, HeadSelection):
        raise TypeError(
            "heads must be a {layer: [head, ...]} dict; pass selection.top(k), not the HeadSelection"
        )
    if "l1" in train_kwargs:
        raise TypeError(
            "train_offsets() takes no l1: the L1 penalty belongs to select_heads (offsets use λ = 0)"
        )
    val_data = train_kwargs.pop("val_data", None)
    adapter_name = train_kwargs.pop("adapter_name", "default")
    target_modules = train_kwargs.pop("target_modules", None)
    config = TrainingConfig.from_kwargs(train_kwargs, owner="train_offsets", **TRAIN_OFFSETS_DEFAULTS)
    check_plain_model(base_model, "train_offsets")
    records, val_records = train_val_records(train_data, val_data, objective)
    task, train_examples, val_examples = encode_train_val(
        objective, tokenizer, records, val_records, config.max_length, config.beta
    )
    adapter = LofitConfig(
        heads=heads,
        use_scale=False,
        use_offset=True,
        init_std=config.init_std,
        target_modules=target_modules,
    )
    state = BaseModelState.capture(base_model)
    seed_everything(config.seed)
    model = get_lofit_model(base_model, adapter, adapter_name)
    try:
        history = train_adapter(
            model, task, train_examples, config, val_examples=val_examples, description="train offsets"
        )
    except BaseException:
        model.unload()  # hand the base model back as it came
        state.restore(base_model)
        raise
    vars(model)["training_history"] = history  # a plain attribute, read as model.training_history
    return model
