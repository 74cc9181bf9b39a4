"""LoReFT (Wu et al. 2024, "ReFT: Representation Finetuning for Language Models"), our own code.

At chosen decoder layers, the layer's output h (the residual stream) at chosen prompt positions becomes

    Φ(h) = h + Rᵀ(W h + b − R h),   R ∈ R^{r×d} with orthonormal rows, W ∈ R^{r×d}, b ∈ R^r,

i.e. h's component in the r-dimensional subspace spanned by R's rows is replaced by W h + b. R is kept
orthonormal by `torch.nn.utils.parametrizations.orthogonal` (as `pyreft`'s LowRankRotateLayer, with the
matrix-exponential map), so every optimiser step stays on the manifold. Parameters stay fp32.

Positions: the first `first` and the last `last` tokens of each row's *prompt* (pyreft's "f{p}+l{s}").
LoReFT never edits response tokens, nor the tokens a generation step adds. The prompt of a row is
found, in this order:

1. the lengths given by `with model.prompt_lengths([...])` (one per row);
2. the longest prompt registered with `model.register_prompts(...)` that the row starts with (this is
   how training and scoring sequences, prompt + response, are told apart from their prompt), else the
   longest registered prompt minus its last token (a token merged across the prompt/response boundary);
3. otherwise the whole row (the prefill step of generation, whose input is exactly the prompt).

Padding is read from the attention mask (left or right). A forward step on a non-empty KV cache is a
generation step: no position is edited.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from ..adapters.wrappers import SwitchableModel
from ..errors import LofitValueError
from ..training.activation_checkpointing import decoder_layers
from ..training.tokens import encode


class LoreftError(LofitValueError):
    """Invalid LoReFT configuration or input; the message says what to change."""


class LoreftIntervention(nn.Module):
    """Φ(h) = h + Rᵀ(W h + b − R h) on the last dimension of h (computed in fp32).

    Args:
        hidden_size: d, the width of h.
        rank: r (1 <= r <= d), the dimension of the edited subspace.

    Example:
        >>> phi = LoreftIntervention(8, 2)
        >>> r = phi.rotation
        >>> torch.allclose(r @ r.T, torch.eye(2), atol=1e-5)
        True
        >>> phi(torch.zeros(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(self, hidden_size: int, rank: int) -> None:
        super().__init__()
        if not 1 <= rank <= hidden_size:
            raise LoreftError(f"rank must be between 1 and the hidden size {hidden_size}, got {rank}")
        # weight [r, d] with orthonormal rows. "matrix_exp", not the default "householder" map for a
        # non-square weight: with householder, a few AdamW steps at lr 0.1 collapse R to zero (tested).
        self.rotate = orthogonal(nn.Linear(hidden_size, rank, bias=False), orthogonal_map="matrix_exp")
        self.learned_source = nn.Linear(hidden_size, rank)  # W [r, d] and b [r]

    @property
    def rotation(self) -> torch.Tensor:
        """R [rank, hidden] (orthonormal rows)."""
        weight = self.rotate.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rotation = self.rotation.float()
        h = hidden.float()
        edit = self.learned_source(h) - h @ rotation.T  # W h + b − R h, [..., r]
        return (h + edit @ rotation).to(hidden.dtype)


class LoreftModel(SwitchableModel):
    """A causal LM with a LoReFT intervention on the output of each layer in `layers`.

    Only the interventions' parameters are trainable. `disable_adapter()` gives the base model back.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        >>> model = get_loreft_model(base, layers=[1], rank=4, first=1, last=1)
        >>> sum(p.numel() for p in model.parameters() if p.requires_grad)   # R (4x32) + W (4x32) + b (4)
        260
    """

    def __init__(
        self, base_model: nn.Module, layers: Sequence[int], rank: int, first: int, last: int
    ) -> None:
        super().__init__()
        self.model = base_model
        blocks = decoder_layers(base_model)
        chosen = sorted(set(int(x) for x in layers))
        if not chosen or any(not 0 <= x < len(blocks) for x in chosen):
            raise LoreftError(
                f"layers must be a non-empty subset of 0..{len(blocks) - 1}, got {list(layers)}"
            )
        if first < 0 or last < 0 or first + last == 0:
            raise LoreftError(f"first and last must be >= 0 and not both 0, got first={first}, last={last}")
        width = int(base_model.get_input_embeddings().embedding_dim)  # type: ignore[operator]
        self.layer_indices = chosen
        self.first, self.last = first, last
        self.interventions = nn.ModuleList(LoreftIntervention(width, rank) for _ in chosen)
        device = base_model.get_input_embeddings().weight.device  # type: ignore[operator]
        self.interventions.to(device=device, dtype=torch.float32)
        self.disabled = False
        self._lengths: list[int] | None = None
        self._prompts: dict[int, set[tuple[int, ...]]] = {}
        self._heads: dict[int, set[tuple[int, ...]]] = {}  # registered prompts without their last token
        self._mask: torch.Tensor | None = None  # [B, T] positions to edit in the current forward
        decoder = base_model.get_decoder() if hasattr(base_model, "get_decoder") else base_model  # type: ignore[operator]
        self._handles = [decoder.register_forward_pre_hook(self._positions_hook, with_kwargs=True)]
        for position, index in enumerate(chosen):
            hook = self._edit_hook(self.interventions[position])
            self._handles.append(blocks[index].register_forward_hook(hook))
        for param in base_model.parameters():
            param.requires_grad_(False)

    # ------------------------------------------------------------------------ prompts and positions
    def register_prompts(self, tokenizer: Any, prompts: Sequence[str]) -> None:
        """Remember prompts, so that a row starting with one of them edits that prompt's positions only."""
        for prompt in prompts:
            ids = tuple(encode(tokenizer, prompt))
            if ids:
                self._prompts.setdefault(len(ids), set()).add(ids)
                # prompt + response may tokenize the prompt's last token differently (a merge across the
                # boundary); the objectives then score from the common prefix, so match that too.
                self._heads.setdefault(len(ids) - 1, set()).add(ids[:-1])

    @contextlib.contextmanager
    def prompt_lengths(self, lengths: Sequence[int]) -> Iterator[None]:
        """Inside the block, row i's prompt is its first `lengths[i]` non-padding tokens."""
        previous, self._lengths = self._lengths, [int(x) for x in lengths]
        try:
            yield
        finally:
            self._lengths = previous

    def _prompt_length(self, row: list[int]) -> int:
        for table in (self._prompts, self._heads):
            for length in sorted(table, reverse=True):
                if 0 < length <= len(row) and tuple(row[:length]) in table[length]:
                    return length
        return len(row)

    def edit_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, T] bool: the first `first` and last `last` prompt tokens of each row."""
        mask = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        if self._lengths is not None and len(self._lengths) != input_ids.shape[0]:
            raise LoreftError(
                f"prompt_lengths has {len(self._lengths)} entries for {input_ids.shape[0]} rows"
            )
        edit = torch.zeros_like(mask)
        for row in range(input_ids.shape[0]):
            valid = mask[row].nonzero().flatten()
            ids = input_ids[row, valid].tolist()
            length = self._lengths[row] if self._lengths is not None else self._prompt_length(ids)
            prompt = valid[: min(length, len(ids))]
            edit[row, prompt[: self.first]] = True
            edit[row, prompt[max(len(prompt) - self.last, 0) :]] = True
        return edit

    def _positions_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 names it `cache`
        cached = cache is not None and hasattr(cache, "get_seq_length") and int(cache.get_seq_length()) > 0
        if input_ids is None or cached or self.disabled:
            self._mask = None  # a generation step after the prompt (or embeddings given): edit nothing
            return
        self._mask = self.edit_mask(input_ids, kwargs.get("attention_mask"))

    def _edit_hook(self, intervention: nn.Module) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self._mask is None or self.disabled:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            where = self._mask.to(hidden.device)[..., None]
            edited = torch.where(where, intervention(hidden), hidden)
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return hook

    # ------------------------------------------------------------------------ adapter API
    def unload(self) -> nn.Module:
        """Remove the hooks; return the plain base model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.model


def get_loreft_model(
    base_model: nn.Module, layers: Sequence[int], rank: int = 4, first: int = 1, last: int = 1
) -> LoreftModel:
    """Wrap `base_model` with LoReFT on the outputs of decoder `layers` (see the module docstring).

    Args:
        base_model: a causal LM (frozen by this call).
        layers: decoder layer indices whose output is edited.
        rank: r, the dimension of each edited subspace.
        first: how many leading prompt tokens are edited.
        last: how many trailing prompt tokens are edited.

    Returns:
        The wrapped model; its trainable parameters are the interventions' (R, W, b per layer).
    """
    return LoreftModel(base_model, layers, rank, first, last)
