"""RepE (Zou et al. 2023, "Representation Engineering") as the LoFiT paper runs it as a baseline.

One decoder layer's output (the residual stream after that layer) is shifted by α·s·u at every position,
in scoring and at every generation step. u is a unit direction read from paired true/false texts at
their last token:

- **reading vector** (the paper's choice for TruthfulQA): the first principal component of the paired
  differences d_i = h(true_i) − h(false_i);
- **contrast vector** (MQuAKE, CLUTRR): the mean difference mean(h | true) − mean(h | false), normalised.

Choices the paper leaves open, and the ones made here:

- *PCA of the differences:* RepE's code shuffles the order inside each pair (so differences are ±d_i)
  and runs PCA on the re-centred differences; the expected result is the top eigenvector of E[d dᵀ].
  We take that eigenvector directly (the top right singular vector of the uncentred difference matrix):
  deterministic, no shuffle. Its sign is chosen so that the mean difference projects positively
  (true minus false), which RepE fixes afterwards with labelled data.
- *Scale:* α multiplies the unit direction scaled to the layer's typical coordinate size,
  s = mean ‖h‖₂ / √hidden over the texts' last-token residuals, so that α means the same on models
  whose residual norms differ by orders of magnitude (α = 5 shifts by 5 RMS coordinates, about
  5/√hidden of a typical residual's norm).
- *Layer and α:* chosen on validation data by the caller (see `benchmarks.paper.units`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.wrappers import SwitchableModel
from ..errors import LofitValueError
from ..selection.activations import record_activations
from ..training.activation_checkpointing import decoder_layers
from ..training.batching import pad_token_id
from ..training.tokens import encode

REPE_KINDS = ("reading", "contrast")


class RepeError(LofitValueError):
    """Invalid RepE input (texts, layer, direction); the message says what to change."""


def residual_at_last_token(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 8
) -> torch.Tensor:
    """Every decoder layer's output at each text's last token: fp32 [N, layers, hidden] on CPU.

    Args:
        model: a causal LM (or a wrapper of one whose decoder layers are its submodules).
        tokenizer: its tokenizer.
        texts: the texts; each one is tokenized alone (with the tokenizer's special tokens).
        batch_size: texts per forward pass (right-padded; `lofit.selection.activations.record_activations`).

    Returns:
        A tensor [len(texts), num_layers, hidden_size].

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        >>> class Tok:
        ...     eos_token_id, pad_token_id = 0, 0
        ...     def __call__(self, text, add_special_tokens=True):
        ...         return {"input_ids": [1 + ord(c) % 60 for c in text]}
        >>> residual_at_last_token(base, Tok(), ["ab", "abc"]).shape
        torch.Size([2, 2, 32])
    """
    if batch_size < 1:
        raise RepeError(f"batch_size must be >= 1, got {batch_size}")
    if not texts:
        raise RepeError("texts is empty; pass at least one text")
    sequences = [encode(tokenizer, text) for text in texts]
    if any(not s for s in sequences):
        raise RepeError("a text produced no tokens; drop empty texts")
    return record_activations(
        model,
        decoder_layers(model),
        sequences,
        read="output",
        batch_size=batch_size,
        pad_token_id=pad_token_id(tokenizer),
    )


def _check_pairs(positive: torch.Tensor, negative: torch.Tensor) -> None:
    if positive.dim() != 3 or negative.dim() != 3 or positive.shape[1:] != negative.shape[1:]:
        raise RepeError(
            f"positive and negative must both be [N, layers, hidden] with equal layers and hidden; got "
            f"{tuple(positive.shape)} and {tuple(negative.shape)}"
        )
    if positive.shape[0] == 0 or negative.shape[0] == 0:
        raise RepeError("RepE needs at least one true and one false example")


def reading_vector(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Per layer, the unit first principal direction of the paired differences positive − negative.

    Args:
        positive: [N, layers, hidden] residuals of the true texts.
        negative: [N, layers, hidden] residuals of their paired false texts (same order).

    Returns:
        [layers, hidden] unit vectors, each signed so that the mean difference projects positively.

    Example:
        >>> pos = torch.tensor([[[3.0, 1.0]], [[-2.0, 1.0]], [[4.0, 1.0]]])
        >>> [round(x, 3) for x in reading_vector(pos, torch.zeros_like(pos))[0].tolist()]  # spread along x
        [0.983, 0.183]
    """
    _check_pairs(positive, negative)
    if positive.shape[0] != negative.shape[0]:
        raise RepeError(
            f"a reading vector needs pairs: got {positive.shape[0]} true and {negative.shape[0]} false"
        )
    differences = (positive.double() - negative.double()).transpose(0, 1)  # [L, N, d]
    _, _, vh = torch.linalg.svd(differences, full_matrices=False)
    directions = vh[:, 0, :]  # [L, d]
    sign = torch.sign((differences.mean(1) * directions).sum(-1))
    return (directions * torch.where(sign == 0, 1.0, sign)[:, None]).float()


def contrast_vector(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Per layer, the unit mean difference mean(positive) − mean(negative): [layers, hidden].

    Example:
        >>> contrast_vector(torch.tensor([[[3.0, 4.0]]]), torch.zeros(2, 1, 2)).tolist()
        [[0.6000000238418579, 0.800000011920929]]
    """
    _check_pairs(positive, negative)
    difference = positive.double().mean(0) - negative.double().mean(0)
    norm = difference.norm(dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise RepeError("the true and false means coincide at some layer; the texts do not differ there")
    return (difference / norm).float()


def residual_scale(residuals: torch.Tensor) -> torch.Tensor:
    """Typical coordinate size per layer, mean ‖h‖₂ / √hidden, of [N, layers, hidden] residuals: [layers]."""
    return residuals.double().norm(dim=-1).mean(0).div(residuals.shape[-1] ** 0.5).float()


@dataclass(frozen=True)
class RepeShift:
    """The shift RepE adds to one layer's output: `alpha * scale * direction`."""

    layer: int
    direction: torch.Tensor
    alpha: float
    scale: float

    @property
    def vector(self) -> torch.Tensor:
        return self.alpha * self.scale * self.direction.float()


class RepeModel(SwitchableModel):
    """A base model whose decoder layer `shift.layer` adds `shift.vector` to its output at every position.

    Nothing is trained; `disable_adapter()` gives the base model back inside a block.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        >>> model = apply_repe(base, RepeShift(1, torch.ones(32) / 32**0.5, alpha=5.0, scale=1.0))
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> with model.disable_adapter():
        ...     plain = model(input_ids=ids).logits
        >>> bool((model(input_ids=ids).logits - plain).abs().max() > 0)
        True
    """

    def __init__(self, base_model: nn.Module, shift: RepeShift) -> None:
        super().__init__()
        self.model = base_model
        self.layers = decoder_layers(base_model)
        self.disabled = False
        self.handle: Any = None
        self.set_shift(shift)

    def set_shift(self, shift: RepeShift) -> None:
        """Replace the shift (another layer, direction or α), e.g. in a validation sweep."""
        if not 0 <= shift.layer < len(self.layers):
            raise RepeError(
                f"layer {shift.layer} is out of range; this model has layers 0..{len(self.layers) - 1}"
            )
        embeddings = self.model.get_input_embeddings()  # type: ignore[operator]
        width = int(getattr(embeddings, "embedding_dim", shift.direction.numel()))
        if tuple(shift.direction.shape) != (width,):
            raise RepeError(f"direction must have shape ({width},), got {tuple(shift.direction.shape)}")
        if self.handle is not None:
            self.handle.remove()
        self.shift = shift
        vector = shift.vector

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self.disabled:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            shifted = (hidden.float() + vector.to(hidden.device)).to(hidden.dtype)
            return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

        self.handle = self.layers[shift.layer].register_forward_hook(hook)

    def unload(self) -> nn.Module:
        """Remove the hook; return the plain base model."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        return self.model


def apply_repe(base_model: nn.Module, shift: RepeShift) -> RepeModel:
    """Wrap `base_model` so that decoder layer `shift.layer` adds α·s·u to its output (see `RepeModel`).

    Args:
        base_model: a causal LM; a `RepeModel` gets its shift replaced instead of a second hook.
        shift: layer, unit direction, α and scale s.

    Returns:
        The wrapped model (no trainable parameters).
    """
    if isinstance(base_model, RepeModel):
        base_model.set_shift(shift)
        return base_model
    return RepeModel(base_model, shift)
