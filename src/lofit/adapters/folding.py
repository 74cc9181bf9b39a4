"""The arithmetic of folding an edit into a projection's weight and bias (used by the adapter layers).

LoFiT edits the projection's input: W((1 + A) ⊙ z + v) = (W · diag(1 + A)) z + W v, so scales multiply
the input columns and offsets add W v to the bias (`fold_input_edit`). RED edits the output:
(1 + s) ⊙ (W z + c) + b, so scales multiply the rows and the bias becomes (1 + s) ⊙ c + b
(`fold_output_edit`). A quantised projection (bitsandbytes 4/8-bit) keeps its packed weights: only an
offset folds, into a float bias computed through the layer itself; scales are refused. A projection
wrapped by PEFT's LoRA folds exactly too: the scale also multiplies `lora_A`'s input columns, the
offset goes through the whole layer (W v + B A v).

Merged models that plain transformers loads: `lofit.adapters.merged`; writing them: `lofit.integrations.export`.

Example:
    >>> import torch
    >>> layer, x = torch.nn.Linear(4, 3), torch.randn(5, 4)
    >>> scale, offset = torch.rand(4) + 0.5, torch.randn(4)
    >>> edited = layer(scale * x + offset)
    >>> fold_input_edit(layer, scale, offset)
    >>> bool(torch.allclose(layer(x), edited, atol=1e-5))
    True
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LofitValueError
from .heads import module_tensor


class MergeError(LofitValueError):
    """The adapter cannot be folded into (or exported with) this base model; the message says why."""


def innermost(module: nn.Module) -> nn.Module:
    """The module under every `base_layer` wrapper (PEFT's LoRA layer, for instance)."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer  # type: ignore[assignment]
    return module


def _check_finite(*values: torch.Tensor | None) -> None:
    for value in values:
        if value is not None and not torch.isfinite(value).all():
            raise MergeError("merging produced NaN/inf values; the adapter vectors are not finite")


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _matrix(module: nn.Module) -> torch.Tensor:
    """The weight as an fp32 [out, in] matrix (transposing GPT-2's Conv1D)."""
    weight = module_tensor(module, "weight").float()
    return weight.t() if _is_conv1d(module) else weight


def _write_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    weight = module_tensor(module, "weight")
    weight.copy_((matrix.t() if _is_conv1d(module) else matrix).to(weight.dtype))


def add_to_bias(module: nn.Module, delta: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """`module.bias += delta` in fp32, creating a (frozen) bias of `dtype` when the module has none."""
    with torch.no_grad():
        if getattr(module, "bias", None) is None:
            dtype = dtype or module_tensor(module, "weight").dtype
            module.bias = nn.Parameter(
                torch.zeros(delta.shape[0], dtype=dtype, device=delta.device), requires_grad=False
            )
        bias = module_tensor(module, "bias")
        bias.copy_((bias.float() + delta.to(bias.device)).to(bias.dtype))


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype a layer computes in (bitsandbytes' compute_dtype for packed weights)."""
    weight = module_tensor(module, "weight")
    if weight.dtype.is_floating_point:
        return weight.dtype
    compute = getattr(module, "compute_dtype", None)
    if isinstance(compute, torch.dtype) and compute.is_floating_point:
        return compute
    return torch.float16 if weight.device.type == "cuda" else torch.float32


def _through_layer(layer: nn.Module, offset: torch.Tensor) -> torch.Tensor:
    """layer(v) − layer(0) in fp32, in eval mode (no dropout): the linear part of the layer applied to v."""
    inner = innermost(layer)
    dtype = compute_dtype(inner)
    modes = [(m, m.training) for m in layer.modules()]
    layer.eval()
    try:
        with torch.no_grad():
            probe = torch.stack([offset, torch.zeros_like(offset)])
            out = layer(probe.to(device=module_tensor(inner, "weight").device, dtype=dtype)).float()
    finally:
        for module, mode in modes:
            module.training = mode
    return out[0] - out[1]


def lora_layers(layer: nn.Module) -> list[nn.Module]:
    """The `lora_A` linear layers of a PEFT LoRA wrapper (empty for anything else)."""
    lora_a = getattr(layer, "lora_A", None)
    return list(lora_a.values()) if isinstance(lora_a, nn.ModuleDict) else []


def refusal_for_scale(layer: nn.Module) -> MergeError | None:
    """Why a scale cannot be folded into `layer` (None if it can)."""
    inner = innermost(layer)
    if not module_tensor(inner, "weight").dtype.is_floating_point:
        return MergeError(
            f"{type(inner).__name__} has {module_tensor(inner, 'weight').dtype} (quantised) weights; a "
            "scale would have to be folded into them, which lofit does not do. Merge an offsets-only adapter, "
            "or load the base model without quantization to merge scales"
        )
    if layer is not inner and not lora_layers(layer):
        return MergeError(
            f"the adapted projection is wrapped by {type(layer).__name__}, into which lofit cannot fold a "
            "scale; merge that wrapper first (e.g. peft's merge_and_unload) or unload it"
        )
    magnitude = getattr(layer, "lora_magnitude_vector", None)
    if isinstance(magnitude, nn.ModuleDict) and len(magnitude):
        return MergeError(
            "the adapted projection carries a DoRA adapter, whose column norms a scale would change; merge "
            "the DoRA adapter first (peft's merge_and_unload), then merge LoFiT"
        )
    return None


def fold_input_edit(layer: nn.Module, scale: torch.Tensor | None, offset: torch.Tensor | None) -> None:
    """Fold z <- scale ⊙ z + offset (a factor, not A: pass 1 + A) into `layer` in place.

    Args:
        layer: nn.Linear, GPT-2's Conv1D, a quantised linear layer (offset only) or a PEFT LoRA layer.
        scale: the factor per input feature ([in]), or None.
        offset: the offset per input feature ([in]), or None.

    Raises:
        MergeError: for non-finite results or a scale the layer cannot take (nothing is changed then).
    """
    inner = innermost(layer)
    if scale is not None:
        refusal = refusal_for_scale(layer)
        if refusal is not None:
            raise refusal
    with torch.no_grad():
        plain = layer is inner and module_tensor(inner, "weight").dtype.is_floating_point
        if offset is None:
            bias_delta = None
        elif plain:
            bias_delta = _matrix(inner) @ offset.float().to(module_tensor(inner, "weight").device)
        else:
            bias_delta = _through_layer(layer, offset.float())
        new_matrix = (
            None
            if scale is None
            else _matrix(inner) * scale.float().to(module_tensor(inner, "weight").device)[None, :]
        )
        _check_finite(bias_delta, new_matrix)
        if new_matrix is not None:
            _write_matrix(inner, new_matrix)
            for lora in lora_layers(layer):
                lora_weight = module_tensor(lora, "weight")
                factor = scale.float().to(lora_weight.device)[None, :]  # type: ignore[union-attr]
                lora_weight.copy_((lora_weight.float() * factor).to(lora_weight.dtype))
        if bias_delta is not None:
            add_to_bias(inner, bias_delta, compute_dtype(inner))


def fold_output_edit(layer: nn.Module, scale: torch.Tensor, bias: torch.Tensor) -> None:
    """Fold h <- scale ⊙ h + bias (a factor: pass 1 + s) into a plain float projection in place."""
    if innermost(layer) is not layer or not module_tensor(layer, "weight").dtype.is_floating_point:
        raise MergeError(
            f"{type(layer).__name__} is quantised or wrapped; RED can only be merged into a plain float "
            "nn.Linear or Conv1D. Load the base model without quantization or other adapters to merge"
        )
    weight = module_tensor(layer, "weight")
    with torch.no_grad():
        factor = scale.float().to(weight.device)
        new_matrix = _matrix(layer) * factor[:, None]
        old_bias = getattr(layer, "bias", None)
        old = old_bias.float() if isinstance(old_bias, torch.Tensor) else torch.zeros_like(factor)
        new_bias = old * factor + bias.float().to(weight.device)
        _check_finite(new_matrix, new_bias)
        _write_matrix(layer, new_matrix)
        if isinstance(old_bias, torch.Tensor):
            old_bias.copy_(new_bias.to(old_bias.dtype))
        else:
            layer.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=False)
