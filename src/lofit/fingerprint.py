"""The identity of a base model that an adapter records, and the check that a base model matches it.

An adapter stores the base model's type, sizes and a fingerprint of its weights; loading it onto another
model raises `BaseModelMismatchError` instead of silently applying offsets learned for different weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BaseModelMismatchError
from .heads import HeadGeometry, projection_weight_matrix, text_config

FINGERPRINT_SAMPLES = 8
FINGERPRINT_RTOL = 0.02
DTYPE_RTOL = 2**-7  # twice bf16's rounding error


def projection_fingerprint(weight: torch.Tensor) -> list[float] | None:
    """[std, then FINGERPRINT_SAMPLES evenly spaced weight values]; None for packed (quantised) weights."""
    if not weight.dtype.is_floating_point or weight.device.type == "meta":
        return None
    flat = weight.detach().reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, FINGERPRINT_SAMPLES, device=flat.device).long()
    std = flat.float().std().item()
    return [std, *flat[index].float().tolist()]


def base_model_identity(model: nn.Module, geometry: HeadGeometry) -> dict[str, Any]:
    config = text_config(getattr(model, "config", None))
    fingerprints = []
    bias_fingerprints = []
    for site in geometry.sites:
        module = model.get_submodule(site.name)
        module = getattr(module, "base_layer", module)
        fingerprints.append(projection_fingerprint(projection_weight_matrix(module)))
        bias = getattr(module, "bias", None)
        bias_fingerprints.append(None if bias is None else projection_fingerprint(bias))
    return {
        "model_type": geometry.model_type,
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
        "hidden_size": getattr(config, "hidden_size", getattr(config, "n_embd", None)),
        "vocab_size": getattr(config, "vocab_size", None),
        "num_layers": geometry.num_layers,
        "num_heads": geometry.num_heads,
        "head_dim": geometry.head_dim,
        "projection_fingerprint": fingerprints,
        # None = no bias. A merged offset adds or changes the bias without touching the weight.
        "projection_bias_fingerprint": bias_fingerprints,
    }


def check_same_base(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    """Raise BaseModelMismatchError if `current` is not the base model the adapter was saved for."""
    for key in ("model_type", "num_layers", "num_heads", "head_dim", "hidden_size", "vocab_size"):
        if saved.get(key) != current.get(key):
            raise BaseModelMismatchError(
                f"{source}: this adapter was trained for a {saved.get('model_type')} model "
                f"({saved.get('name_or_path') or 'unnamed'}) with {key}={saved.get(key)}, but the base model "
                f"given has {key}={current.get(key)}; load the adapter onto the base model it was trained on"
            )
    mismatch = (
        f"{source}: the base model's attention output %s in layer %d differ from those this adapter was "
        f"trained on ({saved.get('name_or_path') or 'unnamed'}); it is a different (or already merged or "
        "fine-tuned) model. Load the adapter onto its original base model"
    )
    for layer, (old, new) in enumerate(
        zip(saved.get("projection_fingerprint") or [], current["projection_fingerprint"], strict=False)
    ):
        if old is not None and new is not None and not _close(old, new):  # None: quantised, not comparable
            raise BaseModelMismatchError(mismatch % ("weights", layer))
    saved_biases = saved.get("projection_bias_fingerprint")
    if isinstance(saved_biases, list):  # absent in files from lofit versions before it was recorded
        for layer, (old, new) in enumerate(
            zip(saved_biases, current["projection_bias_fingerprint"], strict=False)
        ):
            if (old is None) != (new is None) or (old is not None and not _close(old, new)):
                raise BaseModelMismatchError(mismatch % ("biases", layer))


def _close(old: list[float], new: list[float]) -> bool:
    # Absolute slack relative to the spread, plus relative slack for bf16/fp16 rounding of large values,
    # so the same model loaded in another dtype still matches while any other model does not.
    spread = FINGERPRINT_RTOL * max(abs(old[0]), 1e-12)
    return len(old) == len(new) and all(
        abs(a - b) <= spread + DTYPE_RTOL * abs(a) for a, b in zip(old, new, strict=True)
    )
