"""FSDP2 for the frozen base: shard its decoder layers over the processes, keep the adapter replicated.

Under `accelerate launch` with an FSDP config (or `ACCELERATE_USE_FSDP=true` under `torchrun`) the loop
shards every decoder layer and then the rest of the causal LM with `torch.distributed.fsdp.fully_shard`,
passing the adapter's parameters as `ignored_params`: each process keeps 1/N of the base weights
between layer calls (gathered layer by layer in forward and backward), while the few adapter vectors
stay whole on every process and their gradients are averaged by the loop's one all-reduce, exactly as
without FSDP. After training the base is handed back unsharded, as it came. The logits are computed
with the model's own forward under FSDP (`TokenScorer` mode "full"): calling the decoder body and the
LM head separately would bypass the root module's gathering of the embeddings and the head.

A config for `accelerate launch --config_file fsdp.yaml -m lofit run ...` (on CPU also set
`ACCELERATE_USE_CPU=true`, without which accelerate's FSDP launcher starts unconnected processes)::

    compute_environment: LOCAL_MACHINE
    distributed_type: FSDP
    num_machines: 1
    num_processes: 4
    mixed_precision: "no"       # lofit's --precision sets autocast itself
    fsdp_config:
      fsdp_version: 2
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import LofitRuntimeError
from .activation_checkpointing import decoder_layers
from .trainable import causal_lm_of

if TYPE_CHECKING:
    from accelerate import Accelerator


def fsdp_requested(accelerator: Accelerator) -> bool:
    """Whether this launch asks for FSDP (accelerate's FSDP config, which sets ACCELERATE_USE_FSDP)."""
    asked = getattr(accelerator.distributed_type, "value", None) == "FSDP" or (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    )
    return asked and accelerator.num_processes > 1


def check_weights_loaded(model: nn.Module) -> None:
    """Refuse a model whose weights are on the meta device (never loaded), with what to change.

    Under an FSDP launch, transformers loads the weights on local rank 0 only when the process group
    already exists ("cpu RAM efficient loading") and expects FSDP to broadcast them; lofit shards with
    FSDP2, which does not, so the other processes would train on empty weights.
    """
    meta = [name for name, param in model.named_parameters() if param.is_meta]
    if meta:
        raise LofitRuntimeError(
            f"{len(meta)} parameters of the model (e.g. {meta[0]}) are on the meta device: their weights "
            "were never loaded in this process. Under accelerate's FSDP launch, load the model before "
            "anything creates an Accelerator, or set FSDP_CPU_RAM_EFFICIENT_LOADING=false"
        )


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s parameters held by this process (the local shard of a sharded parameter).

    Example:
        >>> parameter_bytes(nn.Linear(4, 2))  # 8 weights + 2 biases, fp32
        40
    """
    total = 0
    for param in module.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total


@dataclass
class ShardedBase:
    """The modules `shard_base_model` sharded (innermost first) with their classes before sharding."""

    causal_lm: nn.Module
    units: list[tuple[nn.Module, type]] = field(default_factory=list)


def shard_base_model(model: nn.Module, adapter: Iterable[nn.Parameter]) -> ShardedBase:
    """Shard the frozen base of `model` with FSDP2 (each decoder layer, then the rest), adapter excluded.

    Args:
        model: the adapted model (its adapter parameters stay plain, replicated tensors).
        adapter: the parameters not to shard.

    Returns:
        What `unshard_base_model` needs to hand the base back. Modules sharded already are left alone.
    """
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:  # pragma: no cover - torch < 2.6
        raise LofitRuntimeError(
            f"FSDP was asked for, but torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp."
            "fully_shard); upgrade torch to >= 2.6 or launch without an FSDP config"
        ) from None
    causal_lm = causal_lm_of(model)
    ignored = set(adapter)
    sharded = ShardedBase(causal_lm)
    for unit in [*decoder_layers(causal_lm), causal_lm]:
        if isinstance(unit, FSDPModule):
            continue
        original = type(unit)
        fully_shard(unit, ignored_params=ignored)
        sharded.units.append((unit, original))
    return sharded


def unshard_base_model(sharded: ShardedBase) -> None:
    """Gather every sharded parameter back to a whole tensor and remove FSDP from the modules.

    Collective: every process must call it, in the same order.
    """
    if not sharded.units:
        return
    for unit, _ in sharded.units:
        unit.reshard()  # type: ignore[operator]  # every parameter a shard again, whatever ran last
    _gather_parameters(sharded.causal_lm)
    for unit, original in reversed(sharded.units):
        _remove_fsdp(unit, original)
    for module in sharded.causal_lm.modules():
        for name in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            module.__dict__.pop(name, None)
    sharded.units.clear()


def _remove_fsdp(unit: nn.Module, original: type) -> None:
    """Take FSDP's hooks, state and class off a module whose parameters are whole again."""
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed._composable_state import _module_state_mapping

    state = unit._get_fsdp_state()  # type: ignore[operator]
    for group in state._fsdp_param_groups:
        for handles in (
            group._module_to_pre_save_state_dict_hook_handle,
            group._module_to_pre_load_state_dict_hook_handle,
        ):
            for handle in handles.values():
                handle.remove()
            handles.clear()
        for fsdp_param in group.fsdp_params:
            fsdp_param._post_load_hook_handle.remove()
    state._pre_forward_hook_handle.remove()
    state._post_forward_hook_handle.remove()
    _module_state_mapping.pop(unit, None)
    for key in (STATE_KEY, REGISTRY_KEY):  # fully_shard's entries: it may be applied again later
        entries = unit.__dict__.get(key, {})
        for api in [api for api in entries if getattr(api, "__name__", api) == "fully_shard"]:
            del entries[api]
    unit.__class__ = original


def _gather_parameters(causal_lm: nn.Module) -> None:
    """Replace each DTensor parameter (a shard) by an ordinary parameter holding the whole tensor."""
    from torch.distributed.tensor import DTensor

    gathered: dict[int, nn.Parameter] = {}
    for module in causal_lm.modules():
        for name, param in list(module._parameters.items()):
            if not isinstance(param, DTensor):
                continue
            if id(param) not in gathered:
                whole = param.full_tensor().detach().clone()
                gathered[id(param)] = nn.Parameter(whole, requires_grad=param.requires_grad)
            setattr(module, name, gathered[id(param)])


def sharding_summary(model: nn.Module, full_bytes: int, world: int) -> dict[str, Any]:
    """The per-process parameter memory after sharding, for the training history."""
    local = parameter_bytes(model)
    return {"processes": world, "parameter_bytes_full": full_bytes, "parameter_bytes_local": local}
