"""Fold an adapter into the base model's weights for zero-overhead serving.

W_O((1 + A) ⊙ z + v) = (W_O · diag(1 + A)) z + W_O v: scales multiply the projection's input columns
and offsets become (part of) its bias.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .heads import text_config
from .layer import HeadVectors, LofitProjection

if TYPE_CHECKING:
    from .model import LofitModel


class MergeError(ValueError):
    """The adapter cannot be folded into (or exported with) this base model; the message says why."""


def fold_into_projection(projection: nn.Module, vectors: HeadVectors) -> None:
    """Fold one layer's scale and offset into `projection` (nn.Linear or GPT-2 Conv1D) in place."""
    is_conv1d = type(projection).__name__ == "Conv1D"
    weight = projection.weight
    if not weight.dtype.is_floating_point:
        raise MergeError(
            f"{type(projection).__name__} has {weight.dtype} (quantised) weights; scales cannot be folded into "
            "them. Dequantise the base model or train offsets only"
        )
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
            if projection.bias is None:
                projection.bias = nn.Parameter(
                    torch.zeros(bias_delta.shape[0], dtype=weight.dtype, device=weight.device),
                    requires_grad=False,
                )
            projection.bias.copy_((projection.bias.float() + bias_delta).to(projection.bias.dtype))


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
    for projection in model.projections():
        vectors = vectors_by_layer.get(projection.layer_index)
        if vectors is not None:
            fold_into_projection(projection.base_layer, vectors)
    if any(vectors.offset is not None for vectors in vectors_by_layer.values()):
        _enable_output_bias_in_config(model.base_model)
    return unwrap_projections(model)


def _enable_output_bias_in_config(base: nn.Module) -> None:
    # Records in the config that the attention layers now carry biases, where the architecture has such a
    # switch (Llama family: attention_bias), so that save_pretrained + from_pretrained round-trips.
    config = text_config(getattr(base, "config", None))
    if hasattr(config, "attention_bias") and not config.attention_bias:
        config.attention_bias = True
        _add_missing_attention_biases(base)


def _add_missing_attention_biases(base: nn.Module) -> None:
    """With attention_bias=True, q/k/v (and o) projections expect biases: add exact zeros where absent."""
    for name, module in base.named_modules():
        if (
            isinstance(module, nn.Linear)
            and module.bias is None
            and name.rsplit(".", 1)[-1]
            in (
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
            )
        ):
            module.bias = nn.Parameter(
                torch.zeros(module.out_features, dtype=module.weight.dtype, device=module.weight.device),
                requires_grad=False,
            )


def check_exportable(merged: nn.Module) -> None:
    """Raise MergeError unless a fresh model of this config has every parameter the merged one has.

    That is the condition for `AutoModelForCausalLM.from_pretrained` (without lofit) to load the export.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(merged.config)  # type: ignore[union-attr]
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    expected = {name for name, _ in fresh.named_parameters()}
    missing = sorted(name for name, _ in merged.named_parameters() if name not in expected)
    if missing:
        raise MergeError(
            f"the merged model has parameters {missing[:3]}{' ...' if len(missing) > 3 else ''} that a plain "
            f"{type(merged).__name__} built from its config does not have: this architecture's config cannot "
            "switch on an attention output bias, so the offsets cannot be exported as a plain transformers "
            "checkpoint. Serve the unmerged adapter (LofitModel.from_pretrained) instead"
        )


def export_merged(merged: nn.Module, path: str | os.PathLike[str], tokenizer: object | None = None) -> Path:
    """Save a merged model (from `merge_and_unload`) as a checkpoint that plain transformers loads."""
    check_exportable(merged)
    directory = Path(path)
    merged.save_pretrained(str(directory), safe_serialization=True)  # type: ignore[operator]
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))  # type: ignore[attr-defined]
    return directory
