"""Run the frozen layers below the lowest adapted one once: cache the hidden states entering it.

Step 2 trains offsets on heads of layers >= L only; layers 0..L-1 are frozen and see the same tokens in
every epoch, so their output is the same each time. `LowerLayerCache` keeps, per sequence (keyed by its
tokens, unpadded, in the dtype it arrives in), the hidden state entering layer L during the first pass
over a sequence; a later forward whose sequences are all cached skips layers 0..L-1 (each returns its
input, layer L-1 the cached states, right-padded). Right padding and causal attention make a real
token's hidden state independent of the padding, so the losses and gradients are those of the full
forward. Layer L's input never requires grad (nothing below it trains), so backward is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import LofitValueError
from .encoding import Example

MAX_CACHE_BYTES = 8 * 2**30
_ORIGINAL = "_lofit_forward_before_layer_cache"


class LowerLayerCache:
    """Hidden states entering decoder layer `lowest`, per token sequence; replays them in later passes.

    Args:
        body: the module whose forward receives `input_ids` and `attention_mask` and runs `layers`.
        layers: the decoder layers, in order.
        lowest: the index of the lowest layer that carries an adapter (> 0).
    """

    def __init__(self, body: nn.Module, layers: Sequence[nn.Module], lowest: int) -> None:
        self.body, self.layers, self.lowest = body, list(layers), lowest
        self.states: dict[tuple[int, ...], torch.Tensor] = {}
        self.replayed_forwards = 0
        self._replay: torch.Tensor | None = None
        self._keys: list[tuple[int, ...]] = []
        self._handles: list[Any] = []

    @property
    def num_bytes(self) -> int:
        """Memory the cached states take."""
        return sum(t.numel() * t.element_size() for t in self.states.values())

    def attach(self) -> None:
        """Install the hooks (record on layer `lowest`, decide per forward on `body`) and the skips."""
        self._handles.append(self.body.register_forward_pre_hook(self._before_body, with_kwargs=True))
        self._handles.append(self.layers[self.lowest].register_forward_pre_hook(self._record))
        for index, layer in enumerate(self.layers[: self.lowest]):
            own = layer.__dict__.get("forward")
            layer.__dict__[_ORIGINAL] = own
            layer.forward = self._skipping(own if own is not None else layer.forward, index)

    def detach(self) -> None:
        """Remove everything `attach` installed (the cached states are kept)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self.layers[: self.lowest]:
            if _ORIGINAL in layer.__dict__:
                own = layer.__dict__.pop(_ORIGINAL)
                if own is None:
                    del layer.forward
                else:
                    layer.forward = own
        self._replay = None

    def _before_body(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self._replay, self._keys = None, []
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            return
        lengths = (
            mask.sum(1).tolist() if isinstance(mask, torch.Tensor) else [input_ids.shape[1]] * len(input_ids)
        )
        rows = input_ids.tolist()
        self._keys = [tuple(row[: int(length)]) for row, length in zip(rows, lengths, strict=True)]
        if all(key in self.states for key in self._keys):
            self._replay = self._padded(self._keys, input_ids.shape[1])
            self.replayed_forwards += 1

    def _padded(self, keys: list[tuple[int, ...]], width: int) -> torch.Tensor:
        first = self.states[keys[0]]
        padded = first.new_zeros(len(keys), width, first.shape[-1])
        for row, key in enumerate(keys):
            padded[row, : len(key)] = self.states[key]
        return padded

    def _record(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._replay is not None or not args or not isinstance(args[0], torch.Tensor):
            return
        hidden = args[0].detach()
        for row, key in enumerate(self._keys):
            if key not in self.states:
                self.states[key] = hidden[row, : len(key)].clone()

    def _skipping(self, forward: Any, index: int) -> Any:
        def forward_or_skip(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self._replay is None:
                return forward(hidden_states, *args, **kwargs)
            if index < self.lowest - 1:
                return hidden_states
            return self._replay.to(device=hidden_states.device)

        return forward_or_skip


def cache_bytes(examples: Sequence[Example], hidden_size: int) -> int:
    """An upper bound (fp32) of the memory the cache of `examples` takes."""
    return sum(len(s.input_ids) for e in examples for s in e.sequences) * hidden_size * 4


def check_cache_fits(examples: Sequence[Example], hidden_size: int, limit: int = MAX_CACHE_BYTES) -> None:
    """Refuse a cache larger than `limit` bytes (fp32 upper bound), saying what to change."""
    tokens = sum(len(s.input_ids) for e in examples for s in e.sequences)
    needed = cache_bytes(examples, hidden_size)
    if needed > limit:
        raise LofitValueError(
            f"cache_lower_layers would keep {needed / 2**30:.1f} GiB of hidden states ({tokens} tokens x "
            f"{hidden_size}), more than the {limit / 2**30:.0f} GiB allowed; pass cache_lower_layers=False "
            "(or use fewer / shorter records)"
        )
