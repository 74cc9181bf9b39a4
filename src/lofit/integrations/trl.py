"""TRL's `SFTTrainer` and `DPOTrainer` for a `LofitModel` (needs `pip install lofit[trl]`).

TRL recognises adapters by an isinstance check on PEFT's `PeftModel`; a LofitModel is treated as a full model.
Two consequences, and what this module does about them:

- checkpoints would be whole state dicts: `LofitSFTTrainer` and `LofitDPOTrainer` write adapter folders
  (`lofit.integrations.trainer.LofitCheckpointing`);
- `DPOTrainer` without `ref_model` loads a second copy of the base from `config._name_or_path` (an empty name
  for a model built in memory: a download of the repo ''). As PEFT's `ref_model=None` path does,
  `LofitDPOTrainer` uses the policy itself with its adapter disabled (`adapter_disabled_reference`): no copy,
  nothing downloaded, and the reference is exactly the base model.

Only the adapter trains: the base is frozen by `get_lofit_model`, and TRL optimises what requires grad.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn
from trl import DPOTrainer, SFTTrainer

from ..errors import LofitValueError
from .trainer import LofitCheckpointing, as_lofit_model

if TYPE_CHECKING:
    from ..adapters.model import LofitModel


def _wrapped(model: LofitModel) -> nn.Module:
    get_base_model = getattr(type(model), "get_base_model", None)
    return get_base_model(model) if callable(get_base_model) else model.base_model


class _AdapterDisabled:
    """Call `target` with `policy`'s adapter disabled."""

    def __init__(self, policy: LofitModel, target: nn.Module) -> None:
        self.policy, self.target = policy, target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.policy.disable_adapter():
            return self.target(*args, **kwargs)


class AdapterDisabledReference(nn.Module):
    """The base model of a LofitModel, as a DPO reference: the policy's own modules with the adapter disabled.

    It owns no parameters (the policy's are not registered here), so it costs no memory and never trains.
    It offers what TRL's reference path uses: `forward`, `config`, `base_model` (the decoder stack, for TRL's
    fused LM head) and `get_output_embeddings()`.
    """

    policy: LofitModel

    def __init__(self, policy: LofitModel) -> None:
        super().__init__()
        self.__dict__["policy"] = policy  # a plain attribute: not a submodule
        self.config = policy.config

    @property
    def base_model(self) -> _AdapterDisabled:
        """The decoder stack of the wrapped model, run with the adapter disabled."""
        backbone = _wrapped(self.policy).base_model
        assert isinstance(backbone, nn.Module)
        return _AdapterDisabled(self.policy, backbone)

    def get_output_embeddings(self) -> nn.Module:
        """The LM head of the wrapped model."""
        head = _wrapped(self.policy).get_output_embeddings()  # type: ignore[operator]
        assert isinstance(head, nn.Module)
        return head

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward with the adapter disabled."""
        return _AdapterDisabled(self.policy, _wrapped(self.policy))(*args, **kwargs)


def adapter_disabled_reference(model: LofitModel) -> AdapterDisabledReference:
    """The base model of `model` as a DPO `ref_model`, sharing `model`'s weights (no copy).

    Args:
        model: the LofitModel being trained.

    Returns:
        A module whose forward is `model`'s with the adapter disabled.

    Example:
        >>> import torch, lofit
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> expected = base(input_ids=ids).logits
        >>> model = lofit.get_lofit_model(base, lofit.LofitConfig(heads={1: [0]}, init_std=0.5))
        >>> reference = adapter_disabled_reference(model)
        >>> torch.equal(reference(input_ids=ids).logits, expected), torch.equal(model(input_ids=ids).logits, expected)
        (True, False)
        >>> sum(p.numel() for p in reference.parameters())
        0
    """
    return AdapterDisabledReference(model)


def _wrap_for_lofit_config(model: Any, kwargs: dict[str, Any]) -> Any:
    """`model` wrapped by `get_lofit_model` when `kwargs["peft_config"]` is a `LofitConfig` (which is removed).

    TRL's own trainers take `peft_config=` as a PEFT config only; these take a `LofitConfig` there too, so
    `LofitSFTTrainer(model=base, peft_config=LofitConfig(...))` reads like TRL with PEFT.
    """
    from ..adapters.config import LofitConfig
    from ..adapters.model import get_lofit_model

    config = kwargs.get("peft_config")
    if not isinstance(config, LofitConfig):
        return model
    del kwargs["peft_config"]
    if isinstance(model, str):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model)
    if as_lofit_model(model) is not None:
        raise LofitValueError(
            "model is already a LofitModel and peft_config a LofitConfig: pass one of them (the model as it is, "
            "or its base model with peft_config)"
        )
    return get_lofit_model(model, config)


class LofitSFTTrainer(LofitCheckpointing, SFTTrainer):
    """TRL's `SFTTrainer` whose checkpoints of a `LofitModel` are LoFiT adapter folders.

    `peft_config` may be a `LofitConfig`: the model (a module or a model id) is then wrapped with
    `lofit.get_lofit_model(model, peft_config)`, as TRL wraps it with PEFT for a PEFT config.
    """

    def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(_wrap_for_lofit_config(model, kwargs), *args, **kwargs)


class LofitDPOTrainer(LofitCheckpointing, DPOTrainer):
    """TRL's `DPOTrainer` for a `LofitModel`: the reference is the base (adapter disabled); adapter checkpoints.

    Arguments are DPOTrainer's. With `ref_model=None` and a LofitModel as `model`, the reference is
    `adapter_disabled_reference(model)`; pass a `ref_model` to use another one. `peft_config` may be a
    `LofitConfig` (see `LofitSFTTrainer`).
    """

    def __init__(self, model: Any, ref_model: nn.Module | None = None, *args: Any, **kwargs: Any) -> None:
        model = _wrap_for_lofit_config(model, kwargs)
        lofit_model = as_lofit_model(model) if isinstance(model, nn.Module) else None
        if ref_model is None and lofit_model is not None:
            training_args = kwargs.get("args", args[0] if args else None)
            if getattr(training_args, "sync_ref_model", False):
                raise LofitValueError(
                    "sync_ref_model=True has nothing to sync: the reference of a LofitModel is its own base "
                    "(adapter disabled). Set sync_ref_model=False, or pass a ref_model."
                )
            ref_model = adapter_disabled_reference(lofit_model)
        super().__init__(model, ref_model, *args, **kwargs)  # type: ignore[arg-type]  # any module will do
