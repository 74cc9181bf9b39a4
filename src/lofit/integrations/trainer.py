"""`LofitTrainer`: `transformers.Trainer` whose checkpoints are LoFiT adapter folders.

A plain `transformers.Trainer(model=lofit_model, ...)` already trains, checkpoints and resumes a `LofitModel`:
Trainer writes `model.state_dict()` for a model that is not a `PreTrainedModel`, and a LofitModel's state dict
is its active adapter (vectors, config and base identity; `LofitModel.state_dict`), so `save_model()` and every
checkpoint hold a few-KB `model.safetensors` that `LofitModel.from_pretrained(base, folder)` loads, and
`resume_from_checkpoint` / `load_best_model_at_end` copy it back with `load_state_dict`.

What `LofitCheckpointing` (and so `LofitTrainer`, `LofitSFTTrainer`, `LofitDPOTrainer`) adds: its folders are
the canonical adapter folder that `save_pretrained` writes (`lofit_config.json`, readable, +
`lofit_model.safetensors`, + the `adapter_config.json` that makes PEFT's loaders name lofit), which
`lofit eval --adapter`, `lofit merge` and the Hub upload take as they are;

- `_save` (checkpoints and `trainer.save_model()`) writes that folder next to the tokenizer and
  `training_args.bin`;
- `_load_from_checkpoint` (`train(resume_from_checkpoint=...)`) and `_load_best_model`
  (`load_best_model_at_end`) copy the saved vectors into the adapter being trained, in place (the optimizer
  keeps its parameters), from either kind of folder, after checking the base model is the one the adapter
  was trained on.

A model that is not a LofitModel is handled by Trainer's own code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Trainer

from ..adapters.persistence import CONFIG_NAME, state_file
from ..errors import AdapterLoadError

if TYPE_CHECKING:
    from ..adapters.model import LofitModel

    _TrainerBase = Trainer
else:
    _TrainerBase = object

TRAINING_ARGS_NAME = "training_args.bin"  # what transformers.Trainer calls it
_RESUME_ADAPTER = "lofit_resume"


def as_lofit_model(model: nn.Module | None) -> LofitModel | None:
    """`model` if it is a LofitModel (after unwrapping DDP/compile containers), else None."""
    from accelerate.utils import extract_model_from_parallel

    from ..adapters.model import LofitModel

    if model is None:
        return None
    unwrapped = extract_model_from_parallel(model, keep_torch_compile=False)
    return unwrapped if isinstance(unwrapped, LofitModel) else None


def load_checkpoint_into(model: LofitModel, path: str | os.PathLike[str]) -> None:
    """Copy the adapter saved in `path` into `model`'s active adapter, in place and exactly.

    The saved adapter must cover the same heads; trainable flags are left as they were.

    Args:
        model: the model being trained.
        path: a folder written by `LofitModel.save_pretrained` or by transformers' Trainer.

    Raises:
        AdapterLoadError: the folder holds no adapter, another base model's, or other heads.
    """
    if not (Path(path) / CONFIG_NAME).is_file() and state_file(path) is None:
        raise AdapterLoadError(
            f"{path} holds neither {CONFIG_NAME} nor model.safetensors: it is not a checkpoint of a LoFiT "
            "adapter (written by transformers.Trainer or lofit.integrations.LofitTrainer with a LofitModel)"
        )
    active = model.active_adapter
    flags = [param.requires_grad for param in model.parameters()]
    model.load_adapter(path, adapter_name=_RESUME_ADAPTER)
    try:
        saved = model.get_head_params(_RESUME_ADAPTER)
        if model.selected_heads(_RESUME_ADAPTER) != model.selected_heads(active):
            raise AdapterLoadError(
                f"{path}: the saved adapter adapts heads {model.selected_heads(_RESUME_ADAPTER)}, the model's "
                f"adapter {active!r} adapts {model.selected_heads(active)}; resume with the same heads"
            )
    finally:
        model.delete_adapter(_RESUME_ADAPTER)
        model.set_adapter(active)
    model.set_head_params(saved, active)
    for param, flag in zip(model.parameters(), flags, strict=True):
        param.requires_grad_(flag)


class LofitCheckpointing(_TrainerBase):
    """Trainer mixin: checkpoints of a LofitModel are adapter folders (see the module docstring)."""

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        model = as_lofit_model(self.model)
        if model is None:
            super()._save(output_dir, state_dict)
            return
        if not self.args.should_save:
            return
        folder = str(output_dir if output_dir is not None else self.args.output_dir)
        model.save_pretrained(folder)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)
        torch.save(self.args, os.path.join(folder, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        lofit_model = as_lofit_model(model if model is not None else self.model)
        if lofit_model is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        load_checkpoint_into(lofit_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        lofit_model = as_lofit_model(self.model)
        if lofit_model is None or self.state.best_model_checkpoint is None:
            super()._load_best_model()
            return
        load_checkpoint_into(lofit_model, self.state.best_model_checkpoint)


class LofitTrainer(LofitCheckpointing, Trainer):
    """`transformers.Trainer` whose checkpoints of a `LofitModel` are LoFiT adapter folders.

    Everything else is Trainer's: arguments, data collation, logging, evaluation, resuming.

    Example:
        >>> import tempfile, torch, lofit
        >>> from datasets import Dataset
        >>> from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
        >>> from lofit.integrations import LofitTrainer
        >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        >>> model = lofit.get_lofit_model(base, lofit.LofitConfig(heads={1: [0, 2]}))
        >>> ids = torch.randint(0, 64, (4, 8)).tolist()
        >>> data = Dataset.from_dict({"input_ids": ids, "labels": ids})
        >>> out = tempfile.mkdtemp()
        >>> args = TrainingArguments(out, max_steps=2, report_to=[], disable_tqdm=True, use_cpu=True)
        >>> _ = LofitTrainer(model=model, args=args, train_dataset=data).train()  # doctest: +ELLIPSIS
        {'train_runtime': ...}
        >>> sorted(p.name for p in (Path(out) / "checkpoint-2").glob("lofit_*"))
        ['lofit_config.json', 'lofit_model.safetensors']
    """
