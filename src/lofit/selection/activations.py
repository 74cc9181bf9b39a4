"""Recorded activations: `record_activations` (any modules' inputs or outputs at one position per
sequence) and, on it, each head's z (its slice of the attention output projection's input).

This is lofit's one activation recorder: probe-based head selection and the ITI baseline read head
activations through `head_activations`, the RepE baseline reads decoder-layer outputs through
`record_activations`. Hooks keep only the requested token positions, so memory is [N, modules, width].
On a `LofitModel` the head hook sits on the wrapper, so it records z before any LoFiT edit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

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
    device = causal_lm.get_input_embeddings().weight.device  # type: ignore[operator]
    body = _decoder_body(causal_lm, sites)  # skipping the LM head saves the [B, T, vocab] logits
    was_training = causal_lm.training
    causal_lm.eval()
    try:
        recorded = record_activations(
            body,
            hooked,
            sequences,
            positions,
            batch_size=batch_size,
            pad_token_id=pad_token_id,
            device=device,
        )
    finally:
        causal_lm.train(was_training)
    return recorded.view(len(sequences), geometry.num_layers, geometry.num_heads, geometry.head_dim)


def record_activations(
    body: nn.Module,
    modules: Sequence[nn.Module],
    sequences: Sequence[Sequence[int]],
    positions: Sequence[int] | None = None,
    *,
    read: Literal["input", "output"] = "input",
    batch_size: int = 16,
    pad_token_id: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Each module's input (or output) at one position per sequence: fp32 [N, len(modules), width] on CPU.

    The sequences run through `body` in right-padded batches (no gradients); a hook on every module keeps
    row i's activation at `positions[i]` (default: its last token). Outputs that are tuples (decoder
    layers) are read at their first element.

    Args:
        body: what the token ids are fed to (a causal LM or its decoder body).
        modules: submodules of `body` to read, all of the same width.
        sequences: token ids, one list per example.
        positions: one position per sequence; None reads each one's last token.
        read: "input" (a forward pre-hook's first argument) or "output".
        batch_size: sequences per forward pass.
        pad_token_id: the padding id (masked out).
        device: where the ids go; None: the device of `body`'s first parameter.

    Returns:
        The activations, in the order of `sequences` and `modules`.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        >>> record_activations(base, base.model.layers, [[1, 2, 3], [4, 5]], read="output").shape
        torch.Size([2, 2, 32])
    """
    if batch_size < 1:
        raise LofitValueError(f"batch_size must be >= 1, got {batch_size}")
    positions = _checked_positions(sequences, positions)
    device = device if device is not None else next(body.parameters()).device
    recorder = _Recorder(len(modules), read)
    handles = recorder.attach(modules)
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


def right_padded(batch: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] padded on the right with `pad_token_id`, and their attention mask.

    Example:
        >>> ids, mask = right_padded([[5, 6, 7], [8]], pad_token_id=0)
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    width = max(len(s) for s in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, sequence in enumerate(batch):
        input_ids[row, : len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask


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
    """Hooks that keep each module's input (or output) at one position per row of the current batch."""

    def __init__(self, num_modules: int, read: str) -> None:
        self.num_modules = num_modules
        self.read = read
        self.captured: dict[int, torch.Tensor] = {}
        self.rows = torch.empty(0, dtype=torch.long)
        self.cols = torch.empty(0, dtype=torch.long)

    def attach(self, modules: Sequence[nn.Module]) -> list[Any]:
        """Register the hook of every module; returns the handles to remove."""
        if self.read == "input":
            return [m.register_forward_pre_hook(self.hook_for(i)) for i, m in enumerate(modules)]
        return [m.register_forward_hook(self.hook_for(i)) for i, m in enumerate(modules)]

    def hook_for(self, index: int) -> Callable[..., None]:
        """The hook of module `index` (a pre-hook reads `args[0]`, a forward hook the output)."""

        def hook(module: nn.Module, args: tuple[Any, ...], *output: Any) -> None:
            hidden = args[0] if self.read == "input" else output[0]
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            rows, cols = self.rows.to(hidden.device), self.cols.to(hidden.device)
            self.captured[index] = hidden[rows, cols].detach().float().cpu()

        return hook

    def run(
        self,
        body: nn.Module,
        chunk: Sequence[Sequence[int]],
        positions: Sequence[int],
        pad_token_id: int,
        device: torch.device,
    ) -> torch.Tensor:
        """One padded batch through `body`: [len(chunk), modules, width]."""
        input_ids, attention_mask = right_padded(chunk, pad_token_id)
        self.rows = torch.arange(len(chunk))
        self.cols = torch.tensor(list(positions), dtype=torch.long)
        self.captured.clear()
        body(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
        return torch.stack([self.captured[index] for index in range(self.num_modules)], dim=1)


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
