"""Step 2 of LoFiT: learn offsets v on the selected heads only, starting from the base model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ..adapters.base_state import BaseModelState, check_plain_model
from ..adapters.config import HeadMap, LofitConfig
from ..adapters.model import LofitModel, get_lofit_model
from ..tasks.defaults import TRAIN_OFFSETS_DEFAULTS
from ..tasks.records import train_val_records
from .distributed import seed_everything
from .encoding import max_positions
from .loop import train_adapter
from .losses import encode_train_val
from .settings import TrainingConfig, UnknownOptionError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def train_offsets(
    base_model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_data: Any,
    heads: HeadMap | None,
    objective: str = "sft",
    **train_kwargs: Any,
) -> LofitModel:
    """Step 2 of LoFiT: train offsets v on the selected heads, starting from the base model.

    Args:
        base_model: a plain Hugging Face causal LM (it is wrapped, its weights stay frozen).
        tokenizer: its tokenizer.
        train_data: records {"prompt", "completion"} (SFT) or {"prompt", "chosen", "rejected"} (DPO).
        heads: {layer: [head, ...]}, e.g. `selection.top(k)`; None = every head.
        objective: "sft" or "dpo" (against the base model).
        **train_kwargs: `val_data`, `adapter_name` ("default"), `target_modules` (module-name suffixes of
            the attention output projections, when they are not found automatically) and the
            `TrainingConfig` fields (epochs=5, batch_size=8, lr=1e-2, beta=0.5, max_length, seed=42,
            grad_accum, precision, init_std=1e-3, output_dir, checkpoint_every, resume, ...).
            `cache_lower_layers=True` runs the frozen layers below the lowest selected head only in the
            first epoch (their outputs are cached per record; same losses and gradients).

    Returns:
        The trained `LofitModel` (base frozen); its `training_history` attribute holds the
        `TrainingHistory`. On an error the base model is handed back as it came.
    """
    if hasattr(heads, "ranking"):  # a HeadSelection (duck-typed: selection sits above training)
        raise UnknownOptionError(
            "heads must be a {layer: [head, ...]} dict; pass selection.top(k), not the HeadSelection"
        )
    if "l1" in train_kwargs:
        raise UnknownOptionError(
            "train_offsets() takes no l1: the L1 penalty belongs to select_heads (offsets use λ = 0)"
        )
    val_data = train_kwargs.pop("val_data", None)
    adapter_name = train_kwargs.pop("adapter_name", "default")
    target_modules = train_kwargs.pop("target_modules", None)
    config = TrainingConfig.from_kwargs(train_kwargs, owner="train_offsets", **TRAIN_OFFSETS_DEFAULTS)
    check_plain_model(base_model, "train_offsets")
    records, val_records = train_val_records(train_data, val_data, objective)
    task, train_examples, val_examples = encode_train_val(
        objective, tokenizer, records, val_records, config.max_length, config.beta, max_positions(base_model)
    )
    adapter = LofitConfig(
        heads, use_scale=False, use_offset=True, init_std=config.init_std, target_modules=target_modules
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
