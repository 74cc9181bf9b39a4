"""Logit lens of learned offsets (the paper's App. E): which tokens each head's offset v pushes up.

An offset v of head (l, i) adds W_O[:, slice_i] v to the residual stream at every position. Read
through the logit lens, that direction promotes the tokens with the largest entries of

    W_U · norm(W_O[:, slice_i] v)

where W_U is the output embedding and `norm` the model's final normalisation layer applied to the
vector alone (RMSNorm / LayerNorm with its learned weight; for LayerNorm the bias is included, as the
module computes it). The scale of v drops out of RMSNorm, so the ranking shows direction only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.heads import find_output_projections, projection_weight_matrix
from ..adapters.model import LofitModel
from ..errors import LofitValueError

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm")


@dataclass(frozen=True)
class HeadTokens:
    """The top tokens one head's offset promotes: ids, decoded strings and their logit-lens scores."""

    layer: int
    head: int
    token_ids: list[int]
    tokens: list[str]
    scores: list[float]
    offset_norm: float


def final_norm(model: nn.Module) -> nn.Module:
    """The final normalisation module before the LM head (e.g. Llama's `model.norm`, GPT-2's `ln_f`)."""
    causal_lm = model.get_base_model() if isinstance(model, LofitModel) else model
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else causal_lm  # type: ignore[operator]
    for name in FINAL_NORM_NAMES:
        module = getattr(decoder, name, None)
        if isinstance(module, nn.Module):
            return module
    raise LofitValueError(
        f"found no final norm ({', '.join(FINAL_NORM_NAMES)}) on {type(decoder).__name__}; pass norm=<module> "
        "(or norm=nn.Identity() for a model without one)"
    )


def offset_logit_lens(
    model: nn.Module,
    tokenizer: Any,
    offsets: Mapping[tuple[int, int], torch.Tensor] | None = None,
    top_k: int = 10,
    norm: nn.Module | None = None,
) -> list[HeadTokens]:
    """Top tokens of W_U · norm(W_O[:, head] v) for every offset v.

    Args:
        model: a `LofitModel` (its active adapter's offsets are read) or a plain causal LM with `offsets`.
        tokenizer: decodes token ids (`tokenizer.decode([id])`).
        offsets: {(layer, head): v [head_dim]}; default: the LofitModel's learned offsets.
        top_k: how many tokens per head.
        norm: the normalisation applied to the vector; default `final_norm(model)`.

    Returns:
        One `HeadTokens` per head, in (layer, head) order.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        >>> class Tok:
        ...     def decode(self, ids): return f"<{ids[0]}>"
        >>> lens = offset_logit_lens(base, Tok(), {(1, 2): torch.ones(8)}, top_k=3)
        >>> (lens[0].layer, lens[0].head, len(lens[0].tokens))
        (1, 2, 3)
    """
    if top_k < 1:
        raise LofitValueError(f"top_k must be >= 1, got {top_k}")
    if offsets is None:
        if not isinstance(model, LofitModel):
            raise LofitValueError("pass offsets={(layer, head): v} for a model that is not a LofitModel")
        offsets = {pair: entry["offset"] for pair, entry in model.get_head_params().items()}
    if not offsets:
        raise LofitValueError("no offsets to read; train an adapter with use_offset=True or pass offsets")
    causal_lm = model.get_base_model() if isinstance(model, LofitModel) else model
    geometry = model.geometry if isinstance(model, LofitModel) else find_output_projections(model)
    unembed = causal_lm.get_output_embeddings()  # type: ignore[operator]
    normalise = norm if norm is not None else final_norm(model)
    return [
        _head_tokens(causal_lm, geometry, unembed, normalise, tokenizer, pair, v, top_k)
        for pair, v in sorted(offsets.items())
    ]


def _head_tokens(
    causal_lm: nn.Module,
    geometry: Any,
    unembed: nn.Module,
    normalise: nn.Module,
    tokenizer: Any,
    pair: tuple[int, int],
    v: torch.Tensor,
    top_k: int,
) -> HeadTokens:
    layer, head = pair
    if not (0 <= layer < geometry.num_layers and 0 <= head < geometry.num_heads):
        raise LofitValueError(
            f"head ({layer}, {head}) is outside this model's {geometry.num_layers} layers x {geometry.num_heads} heads"
        )
    if v.numel() != geometry.head_dim:
        raise LofitValueError(
            f"offset of head ({layer}, {head}) has {v.numel()} values, expected {geometry.head_dim}"
        )
    projection = causal_lm.get_submodule(geometry.sites[layer].name)
    projection = getattr(projection, "base_layer", projection)  # a LoFiT-wrapped projection
    weight = projection_weight_matrix(projection).float()
    columns = weight[:, head * geometry.head_dim : (head + 1) * geometry.head_dim]
    with torch.no_grad():
        direction = columns @ v.detach().float().to(columns.device)
        normed = normalise(direction.to(_dtype(normalise, direction))[None])
        logits = unembed(normed.to(_dtype(unembed, direction)))[0]
    scores, ids = logits.float().topk(min(top_k, logits.numel()))
    tokens = [tokenizer.decode([i]) for i in ids.tolist()]
    rounded = [round(float(x), 4) for x in scores]
    return HeadTokens(layer, head, ids.tolist(), tokens, rounded, float(v.float().norm()))


def _dtype(module: nn.Module, fallback: torch.Tensor) -> torch.dtype:
    param = next(module.parameters(), None)
    return param.dtype if param is not None else fallback.dtype


def logit_lens_markdown(lens: list[HeadTokens], limit: int | None = None) -> str:
    """A markdown table (head, ‖v‖, top tokens) of `offset_logit_lens` results, largest ‖v‖ first.

    Example:
        >>> print(logit_lens_markdown([HeadTokens(3, 1, [5], [" mother"], [2.5], 0.8)]))
        | head (layer, head) | ‖v‖₂ | top tokens |
        |---|---:|---|
        | (3, 1) | 0.800 | `mother` |
    """
    rows = sorted(lens, key=lambda h: -h.offset_norm)[:limit]
    lines = ["| head (layer, head) | ‖v‖₂ | top tokens |", "|---|---:|---|"]
    for entry in rows:
        tokens = ", ".join(f"`{t.strip() or repr(t)}`" for t in entry.tokens)
        lines.append(f"| ({entry.layer}, {entry.head}) | {entry.offset_norm:.3f} | {tokens} |")
    return "\n".join(lines)
