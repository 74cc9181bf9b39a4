"""Per-head activations: each head's z (its slice of the attention output projection's input).

Used by probe-based head selection and by the ITI baseline. A forward pre-hook on every layer's output
projection keeps only the requested token positions, so memory is [N, layers, heads, head_dim]. On a
`LofitModel` the hook sits on the wrapper, so it records z before any LoFiT edit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapters.heads import HeadGeometry, find_output_projections
from ..adapters.model import LofitModel
from ..errors import LofitValueError
from ..training.batching import pad_token_id
from ..training.tokens import encode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def head_activations(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    positions: Sequence[int] | None = None,
    *,
    batch_size: int = 16,
    pad_token_id: int = 0,
    target_modules: list[str] | None = None,
    after_adapter: bool = False,
) -> torch.Tensor:
    """z of every head at one position per sequence (default: its last token): fp32 [N, L, H, d] on CPU.

    On a LofitModel, z is read before the active adapter's edit unless `after_adapter` is True.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    >>> head_activations(base, [[1, 2, 3], [4, 5]]).shape
    torch.Size([2, 2, 4, 8])
    """
    positions = _checked_positions(sequences, positions)
    causal_lm = model.get_base_model() if isinstance(model, LofitModel) else model
    geometry: HeadGeometry = (
        model.geometry if isinstance(model, LofitModel) else find_output_projections(model, target_modules)
    )
    sites = [causal_lm.get_submodule(site.name) for site in geometry.sites]
    hooked = [getattr(m, "base_layer", m) if after_adapter else m for m in sites]
    recorder = _Recorder(geometry)
    handles = [
        module.register_forward_pre_hook(recorder.hook_for(site.layer))
        for module, site in zip(hooked, geometry.sites, strict=True)
    ]
    device = causal_lm.get_input_embeddings().weight.device  # type: ignore[operator]
    body = _decoder_body(causal_lm, sites)  # skipping the LM head saves the [B, T, vocab] logits
    was_training = causal_lm.training
    causal_lm.eval()
    try:
        with torch.no_grad():
            return torch.cat(
                [
                    recorder.run(
                        body,
                        sequences[start : start + batch_size],
                        positions[start : start + batch_size],
                        pad_token_id,
                        device,
                    )
                    for start in range(0, len(sequences), batch_size)
                ]
            )
    finally:
        for handle in handles:
            handle.remove()
        causal_lm.train(was_training)


def _checked_positions(sequences: Sequence[Sequence[int]], positions: Sequence[int] | None) -> Sequence[int]:
    if positions is None:
        return [len(s) - 1 for s in sequences]
    if len(positions) != len(sequences):
        raise LofitValueError(f"got {len(positions)} positions for {len(sequences)} sequences")
    for index, (sequence, position) in enumerate(zip(sequences, positions, strict=True)):
        if not sequence or not 0 <= position < len(sequence):
            raise LofitValueError(
                f"sequence {index}: position {position} is outside its {len(sequence)} tokens"
            )
    return positions


class _Recorder:
    """Forward pre-hooks that keep each layer's projection input at one position per row."""

    def __init__(self, geometry: HeadGeometry) -> None:
        self.geometry = geometry
        self.captured: dict[int, torch.Tensor] = {}
        self.rows = torch.empty(0, dtype=torch.long)
        self.cols = torch.empty(0, dtype=torch.long)

    def hook_for(self, layer: int) -> Callable[..., None]:
        """The pre-hook of layer `layer`'s output projection."""

        def hook(module: nn.Module, args: tuple[Any, ...], *_: Any) -> None:
            hidden = args[0]
            rows, cols = self.rows.to(hidden.device), self.cols.to(hidden.device)
            self.captured[layer] = hidden[rows, cols].detach().float().cpu()

        return hook

    def run(
        self,
        body: nn.Module,
        chunk: Sequence[Sequence[int]],
        positions: Sequence[int],
        pad_token_id: int,
        device: torch.device,
    ) -> torch.Tensor:
        """One padded batch through `body`: [len(chunk), layers, heads, head_dim]."""
        width = max(len(s) for s in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, sequence in enumerate(chunk):
            input_ids[row, : len(sequence)] = torch.tensor(list(sequence))
            attention_mask[row, : len(sequence)] = 1
        self.rows = torch.arange(len(chunk))
        self.cols = torch.tensor(list(positions))
        self.captured.clear()
        body(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
        geometry = self.geometry
        stacked = torch.stack([self.captured[layer] for layer in range(geometry.num_layers)], dim=1)
        return stacked.view(len(chunk), geometry.num_layers, geometry.num_heads, geometry.head_dim)


def _decoder_body(causal_lm: nn.Module, sites: list[nn.Module]) -> nn.Module:
    """The decoder body (without LM head) if it contains every hooked module, else the whole model."""
    get_decoder = getattr(causal_lm, "get_decoder", None)
    try:
        body = get_decoder() if callable(get_decoder) else None
    except (AttributeError, NotImplementedError, ValueError):
        return causal_lm
    if not isinstance(body, nn.Module):
        return causal_lm
    inside = {id(m) for m in body.modules()}
    return body if all(id(m) in inside for m in sites) else causal_lm


def text_head_activations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    target_modules: list[str] | None = None,
    after_adapter: bool = False,
) -> torch.Tensor:
    """z of every head at the last token of each text: [N, L, H, d] (texts longer than max_length keep their end)."""
    sequences = []
    for text in texts:
        ids = encode(tokenizer, text)
        if not ids:
            raise LofitValueError(f"text {text!r} produced no tokens")
        sequences.append(ids[-max_length:] if max_length else ids)
    return head_activations(
        model,
        sequences,
        batch_size=batch_size,
        pad_token_id=pad_token_id(tokenizer),
        target_modules=target_modules,
        after_adapter=after_adapter,
    )
