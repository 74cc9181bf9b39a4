"""Adapter composition: one new adapter made of several, head by head (`lofit.combine_adapters`).

The combined adapter edits the union of the adapters' heads. On each head h, with weights w_i,

    offset  v_h = sum_i w_i * v_i,h                 (v_i,h = 0 where adapter i does not edit h)
    scale   1 + A_h = prod_i (1 + w_i * A_i,h)      (A_i,h = 0 where adapter i does not edit h)

so each adapter contributes w_i times its own edit. With the default weights (1 each) two adapters on
disjoint heads act exactly as both applied at once; on a head both edit, offsets add, and scales
multiply (the order-free part of applying one after the other; the cross term (1 + A_j) * v_i of a
sequential application is left out, so that the result does not depend on the order of `names`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import LofitValueError
from .config import LofitConfig
from .model import LofitModel, compute_dtype


def _check(model: object, names: object, weights: object) -> tuple[list[str], list[float]]:
    if not isinstance(model, LofitModel):
        raise LofitValueError(
            f"combine_adapters needs a LofitModel (from get_lofit_model / LofitModel.from_pretrained), "
            f"got {type(model).__name__}"
        )
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise LofitValueError(f"names must be a non-empty list of adapter names, got {names!r}")
    names = list(names)
    for name in names:
        model._check_adapter(name)  # an AdapterNameError listing the model's adapters
    if len(set(names)) != len(names):
        raise LofitValueError(f"names lists an adapter twice: {names}; give each once (use weights)")
    if weights is None:
        return names, [1.0] * len(names)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(names):
        raise LofitValueError(
            f"weights must be a list of {len(names)} number(s), one per name; got {weights!r}"
        )
    values = []
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise LofitValueError(f"weights must be finite numbers; got {weight!r} in {list(weights)}")
        values.append(float(weight))
    return names, values


def _combined_config(model: LofitModel, names: list[str]) -> LofitConfig:
    configs = [model.lofit_config[name] for name in names]
    union: dict[int, set[int]] = {}
    for name in names:
        for layer, heads in model.selected_heads(name).items():
            union.setdefault(layer, set()).update(heads)
    return LofitConfig(
        heads={layer: sorted(heads) for layer, heads in sorted(union.items())},
        use_scale=any(c.use_scale for c in configs),
        use_offset=any(c.use_offset for c in configs),
        init_std=0.0,
        target_modules=configs[0].target_modules,
    )


def combine_adapters(
    model: LofitModel,
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    new_name: str = "combined",
) -> LofitModel:
    """Add to `model` an adapter that is the weighted combination of the adapters `names`.

    Its heads are the union of theirs; on each head its offset is the weighted sum of their offsets
    there, and its factor 1 + A the product of their (1 + w_i * A_i) (see the module docstring). The new
    adapter is frozen (inference) and not made active; the other adapters are left as they were.

    Args:
        model: the `LofitModel` holding the adapters.
        names: the adapters to combine (each once).
        weights: one finite number per name (default: 1 each, i.e. the plain sum of the edits).
        new_name: the new adapter's name (must not exist yet).

    Returns:
        `model`, now also holding `new_name`.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from lofit import LofitConfig, get_lofit_model
        >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        >>> model = get_lofit_model(base, LofitConfig(heads={0: [1]}, init_std=0.1), "a")
        >>> model.add_adapter("b", LofitConfig(heads={0: [1], 1: [2]}, init_std=0.1))
        >>> _ = combine_adapters(model, ["a", "b"], weights=[0.5, 2.0], new_name="ab")
        >>> model.selected_heads("ab")
        {0: [1], 1: [2]}
        >>> p, a, b = (model.get_head_params(n) for n in ("ab", "a", "b"))
        >>> bool(torch.allclose(p[(0, 1)]["offset"], 0.5 * a[(0, 1)]["offset"] + 2.0 * b[(0, 1)]["offset"]))
        True
    """
    names, values = _check(model, names, weights)
    config = _combined_config(model, names)
    sources = [model.get_head_params(name) for name in names]
    model._add_vectors(new_name, config)
    try:
        _fill(model, new_name, config, sources, values)
    except BaseException:
        model.delete_adapter(new_name)  # no half-made adapter is left behind
        raise
    return model


def _fill(
    model: LofitModel,
    new_name: str,
    config: LofitConfig,
    sources: list[dict[tuple[int, int], dict[str, torch.Tensor]]],
    values: list[float],
) -> None:
    """Write the combined vectors into the (freshly added, zero) adapter `new_name`; freeze it."""
    combined: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, entry in model.get_head_params(new_name).items():
        offset, factor = torch.zeros_like(entry["offset"]), torch.ones_like(entry["scale"])
        for params, weight in zip(sources, values, strict=True):
            if key in params:
                offset = offset + weight * params[key]["offset"].to(offset)
                factor = factor * (1.0 + weight * params[key]["scale"].to(factor))
        combined[key] = {"offset": offset, "scale": factor - 1.0}
    for kind, used in (("offset", config.use_offset), ("scale", config.use_scale)):
        if not used:
            for entry in combined.values():
                del entry[kind]
    _check_finite(combined, values, compute_dtype(model.get_base_model()))
    model.set_head_params(combined, new_name)
    for param in model.adapter_parameters(new_name):
        param.requires_grad_(False)


def _check_finite(
    combined: dict[tuple[int, int], dict[str, torch.Tensor]], values: list[float], dtype: torch.dtype
) -> None:
    """Refuse a combination whose vectors overflow (in float32, or in the model's dtype `dtype`)."""
    for (layer, head), entry in combined.items():
        for kind, value in entry.items():
            if not (torch.isfinite(value).all() and torch.isfinite(value.to(dtype)).all()):
                raise LofitValueError(
                    f"combine_adapters: with weights {values} the combined {kind} of head ({layer}, {head}) "
                    f"is not finite in {dtype} (the weighted vectors overflow); use smaller weights"
                )
