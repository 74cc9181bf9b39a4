"""Fold an adapter into the base model's weights for zero-overhead serving.

W_O((1 + A) ⊙ z + v) = (W_O · diag(1 + A)) z + W_O v: scales multiply the projection's input columns
and offsets become (part of) its bias. A quantised projection (bitsandbytes 4/8-bit) keeps its packed
weights: only offsets are folded, into a float bias computed through the layer itself; scales are refused.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .atomic import atomic_directory
from .errors import LofitValueError
from .heads import module_tensor, text_config
from .layer import HeadVectors, LofitProjection

if TYPE_CHECKING:
    from .model import LofitModel


class MergeError(LofitValueError):
    """The adapter cannot be folded into (or exported with) this base model; the message says why."""


def fold_into_projection(projection: nn.Module, vectors: HeadVectors) -> None:
    """Fold one layer's scale and offset into `projection` (nn.Linear or GPT-2 Conv1D) in place."""
    is_conv1d = type(projection).__name__ == "Conv1D"
    weight = module_tensor(projection, "weight")
    if not weight.dtype.is_floating_point:
        fold_offset_into_quantized(projection, vectors)
        return
    with torch.no_grad():
        matrix = weight.float().t() if is_conv1d else weight.float()  # [out, in]
        offset = vectors.dense_offset()
        scale = vectors.dense_scale()
        bias_delta = matrix @ offset.to(matrix.device) if offset is not None else None
        new_matrix = matrix * scale.to(matrix.device)[None, :] if scale is not None else None
        for value in (bias_delta, new_matrix):
            if value is not None and not torch.isfinite(value).all():
                raise MergeError("merging produced NaN/inf values; the adapter vectors are not finite")
        if new_matrix is not None:
            weight.copy_((new_matrix.t() if is_conv1d else new_matrix).to(weight.dtype))
        if bias_delta is not None:
            _add_to_bias(projection, bias_delta, weight.dtype)


def fold_offset_into_quantized(projection: nn.Module, vectors: HeadVectors) -> None:
    """Fold an offset into the float bias of a quantised projection; its packed weights stay untouched.

    W v is computed through the layer itself, as projection(v) − projection(0) (the bias cancels), so it
    works for any quantisation scheme and matches what the layer computes, at its compute precision.
    """
    weight = module_tensor(projection, "weight")
    if vectors.scale is not None:
        raise _quantized_scale_error(projection)
    offset = vectors.dense_offset()
    if offset is None:
        return
    bias = getattr(projection, "bias", None)
    dtype = bias.dtype if isinstance(bias, torch.Tensor) else _compute_dtype(projection)
    with torch.no_grad():
        probe = torch.stack([offset, torch.zeros_like(offset)]).to(device=weight.device, dtype=dtype)
        out = projection(probe).float()
        bias_delta = out[0] - out[1]
    if not torch.isfinite(bias_delta).all():
        raise MergeError("merging produced NaN/inf values; the adapter vectors are not finite")
    _add_to_bias(projection, bias_delta, dtype)


def _quantized_scale_error(projection: nn.Module) -> MergeError:
    return MergeError(
        f"{type(projection).__name__} has {module_tensor(projection, 'weight').dtype} (quantised) weights; a "
        "scale would have to be folded into them, which lofit does not do. Merge an offsets-only adapter, or "
        "load the base model without quantization to merge scales"
    )


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype a quantised layer computes in (bitsandbytes' compute_dtype, else fp16/fp32)."""
    compute = getattr(module, "compute_dtype", None)
    if isinstance(compute, torch.dtype) and compute.is_floating_point:
        return compute
    weight = module_tensor(module, "weight")
    return torch.float16 if weight.device.type == "cuda" else torch.float32


def _add_to_bias(projection: nn.Module, delta: torch.Tensor, dtype: torch.dtype) -> None:
    with torch.no_grad():
        if getattr(projection, "bias", None) is None:
            projection.bias = nn.Parameter(
                torch.zeros(delta.shape[0], dtype=dtype, device=delta.device), requires_grad=False
            )
        bias = module_tensor(projection, "bias")
        bias.copy_((bias.float() + delta.to(bias.device)).to(bias.dtype))


def unwrap_projections(model: LofitModel) -> nn.Module:
    """Put each original projection back in place of its wrapper; return the base model."""
    base = model.base_model
    for site in model.geometry.sites:
        wrapper = base.get_submodule(site.name)
        if isinstance(wrapper, LofitProjection):
            parent_name, _, child = site.name.rpartition(".")
            setattr(base.get_submodule(parent_name), child, wrapper.base_layer)
    return base


def merge_into_base(model: LofitModel, adapter_name: str) -> nn.Module:
    vectors_by_layer = model.adapter_vectors(adapter_name)
    for projection in model.projections():  # refuse before changing any layer
        vectors = vectors_by_layer.get(projection.layer_index)
        if (
            vectors is not None
            and vectors.scale is not None
            and not projection.weight.dtype.is_floating_point
        ):
            raise _quantized_scale_error(projection.base_layer)
    quantized = 0
    for projection in model.projections():
        vectors = vectors_by_layer.get(projection.layer_index)
        if vectors is not None:
            quantized += not projection.weight.dtype.is_floating_point
            fold_into_projection(projection.base_layer, vectors)
    if quantized:
        warnings.warn(
            f"{quantized} adapted attention output projection(s) are quantised: only the offsets were merged, "
            "into their (float) bias; the quantised weights are unchanged",
            stacklevel=3,
        )
    return unwrap_projections(model)


# Config switches that give the attention output projection a bias (Llama family, GPT-NeoX: attention_bias;
# OPT: enable_bias). Architectures without one (Mistral, Qwen2, Phi-3: o_proj is hard-wired bias-free)
# cannot express a merged offset in a plain checkpoint.
BIAS_SWITCHES = ("attention_bias", "enable_bias")


@contextlib.contextmanager
def exportable_biases(merged: nn.Module) -> Iterator[None]:
    """Inside the block, `merged` is shaped as its config says a plain transformers model is.

    Merging gives only the adapted output projections a bias. A plain checkpoint needs the config's bias
    switch on and then every module it governs (in Llama: q, k, v and o of every layer) to carry one, so
    the missing ones are added as exact zeros for the export and removed again afterwards: the merged
    model in memory keeps serving without them (each zero bias is an extra add per call).
    """
    config = text_config(getattr(merged, "config", None))
    switch = next((flag for flag in BIAS_SWITCHES if getattr(config, flag, None) is False), None)
    if switch is None or not _has_extra_parameters(merged):
        yield
        return
    added: list[nn.Module] = []
    setattr(config, switch, True)
    try:
        present = {name for name, _ in merged.named_parameters()}
        for name, _ in _skeleton(merged).named_parameters():
            module_name, _, leaf = name.rpartition(".")
            if leaf != "bias" or name in present:
                continue
            module = merged.get_submodule(module_name)
            if isinstance(module, nn.Linear):
                dtype = (
                    module.weight.dtype if module.weight.dtype.is_floating_point else _compute_dtype(module)
                )
                _add_to_bias(module, torch.zeros(module.out_features, device=module.weight.device), dtype)
                added.append(module)
        yield
    finally:
        for module in added:
            module.bias = None  # type: ignore[assignment]
        setattr(config, switch, False)


def _has_extra_parameters(merged: nn.Module) -> bool:
    """Whether `merged` has parameters (merged offsets' biases) that its config does not describe."""
    try:
        expected = {name for name, _ in _skeleton(merged).named_parameters()}
    except MergeError:
        return False  # check_exportable explains
    return any(name not in expected for name, _ in merged.named_parameters())


def _skeleton(model: nn.Module) -> nn.Module:
    """A parameter-free (meta) model built from `model`'s config, as plain transformers would build it."""
    from transformers import AutoModelForCausalLM

    config = getattr(model, "config", None)
    if config is None:
        raise MergeError(
            f"{type(model).__name__} has no Hugging Face config; only transformers models can be exported"
        )
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(copy.deepcopy(config))
    except (ValueError, KeyError, TypeError) as error:
        raise MergeError(
            f"AutoModelForCausalLM cannot build a {type(model).__name__} from its config ({error}); the merged "
            "model cannot be exported as a plain transformers checkpoint"
        ) from None


def check_exportable(merged: nn.Module) -> None:
    """Raise MergeError unless a fresh model of this config has exactly the merged model's parameters.

    That is the condition for `AutoModelForCausalLM.from_pretrained` (without lofit) to load the export
    with nothing dropped and nothing left randomly initialised.
    """
    fresh = _skeleton(merged)
    expected = {name: tuple(p.shape) for name, p in fresh.named_parameters()}
    actual = {name: tuple(p.shape) for name, p in merged.named_parameters()}
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise MergeError(
            f"the merged model has parameters {extra[:3]}{' ...' if len(extra) > 3 else ''} that a plain "
            f"{type(merged).__name__} built from its config does not have: this architecture's config cannot "
            "switch on an attention output bias, so the offsets cannot be exported as a plain transformers "
            "checkpoint. Serve the unmerged adapter (LofitModel.from_pretrained) instead, or train scales only"
        )
    missing = sorted(set(expected) - set(actual))
    mismatched = sorted(n for n in set(actual) & set(expected) if actual[n] != expected[n])
    if missing or mismatched:
        raise MergeError(
            f"a plain {type(merged).__name__} built from the merged model's config has parameters "
            f"{(missing or mismatched)[:3]} that the merged model lacks or shapes differently; transformers "
            "would initialise them randomly on load, so the export is refused"
        )


def export_merged(merged: nn.Module, path: str | os.PathLike[str], tokenizer: object | None = None) -> Path:
    """Save a merged model (from `merge_and_unload`) as a checkpoint that plain transformers loads.

    The files are written into a temporary directory and moved into `path` only once all are complete.
    """
    directory = Path(path)
    with exportable_biases(merged):
        check_exportable(merged)
        with atomic_directory(directory) as tmp:
            merged.save_pretrained(str(tmp))  # type: ignore[operator]  # safetensors by default
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))  # type: ignore[attr-defined]
    return directory


def merge_adapter_checkpoint(
    base: str, adapter_dir: str, out_dir: str, dtype: torch.dtype | str | None = None
) -> Path:
    """Load `base` (see `load_model`), fold the adapter saved in `adapter_dir` into it, export to `out_dir`.

    The result (weights, config, tokenizer) loads with plain `AutoModelForCausalLM.from_pretrained`.
    """
    from .loading import load_model
    from .model import LofitModel

    model, tokenizer = load_model(base, dtype=dtype)
    merged = LofitModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return export_merged(merged, out_dir, tokenizer)
