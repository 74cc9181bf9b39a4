"""`TokenScorer`: log-probabilities of a batch's scored tokens, with the LM head applied only there.

The decoder body runs once, its hidden states are gathered at the positions whose next token is scored,
and only they go through the output embedding. For a 50k vocabulary this saves most of the memory and
time of the LM head.

Under autocast a frozen fp32 weight is cast to the autocast dtype on every call (autocast caches casts
of trainable leaves only). For the output embedding that is vocabulary × hidden values per forward
(168M for Gemma 3's 262k × 640), so the scorer keeps one cast copy of a frozen head weight while the
weight is unchanged and multiplies with it: the same values autocast would compute.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LofitValueError
from .batching import TokenBatch
from .trainable import causal_lm_of

SCORER_MODES = ("auto", "gathered", "full")


class TokenScorer:
    """Log-probabilities of a batch's target tokens under a (adapter-wrapped) causal LM.

    Args:
        model: a causal LM, or a model wrapping one (`LofitModel`, `RedModel`, `AdapterView`, PEFT).
        mode: "gathered" runs the decoder body, gathers the hidden states at the scored positions and
            applies the output embedding (and gemma2-style final logit soft-capping) there only; "full"
            computes all logits with the model's own forward; "auto" checks once, on the first batch,
            that both agree and falls back to "full" (with a warning) where the LM head does more.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from lofit.training.batching import collate
        >>> from lofit.training.encoding import EncodedSequence
        >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        >>> scorer = TokenScorer(base)
        >>> scorer(collate([EncodedSequence((5, 6, 7), 1)], pad_token_id=0)).shape
        torch.Size([2])
    """

    def __init__(self, model: nn.Module, mode: str = "auto") -> None:
        if mode not in SCORER_MODES:
            raise LofitValueError(f"mode must be 'auto', 'gathered' or 'full', got {mode!r}")
        self.model = model
        self.causal_lm = causal_lm_of(model)
        self.mode = mode
        self._head_cast = _FrozenCast()
        if mode != "full" and not self._has_parts():
            if mode == "gathered":
                raise LofitValueError(
                    f"{type(self.causal_lm).__name__} has no separate decoder body/output embedding; use mode='full'"
                )
            self.mode = "full"

    def _has_parts(self) -> bool:
        get_decoder = getattr(self.causal_lm, "get_decoder", None)
        get_head = getattr(self.causal_lm, "get_output_embeddings", None)
        if not callable(get_decoder) or not callable(get_head):
            return False
        try:
            decoder, head = get_decoder(), get_head()
        except (AttributeError, NotImplementedError, ValueError):
            return False
        return (
            isinstance(decoder, nn.Module) and decoder is not self.causal_lm and isinstance(head, nn.Module)
        )

    def logits(self, batch: TokenBatch) -> torch.Tensor:
        """[N, vocab] logits at the batch's scored positions."""
        if self.mode == "auto":
            self.mode = "gathered" if self._gathered_matches_full(batch) else "full"
        if self.mode == "gathered":
            return self._gathered_logits(batch)
        return self._full_logits(batch)

    def __call__(self, batch: TokenBatch) -> torch.Tensor:
        """[N] fp32 log-probabilities of the target tokens."""
        logits = self.logits(batch).float()
        return -F.cross_entropy(logits, batch.targets, reduction="none")

    def _gathered_logits(self, batch: TokenBatch) -> torch.Tensor:
        outputs = self.causal_lm.get_decoder()(  # type: ignore[operator]
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
        hidden = outputs[0][batch.sequence_index, batch.positions]
        logits = self._head_cast.linear(self.causal_lm.get_output_embeddings(), hidden)  # type: ignore[operator]
        cap = getattr(getattr(self.causal_lm, "config", None), "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _full_logits(self, batch: TokenBatch) -> torch.Tensor:
        outputs = self.causal_lm(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
        return outputs.logits[batch.sequence_index, batch.positions]

    def _gathered_matches_full(self, batch: TokenBatch) -> bool:
        batch = batch.first_sequence()  # one sequence shows whether the LM head is a plain projection; cheap
        was_training = self.causal_lm.training
        self.causal_lm.eval()  # dropout would make the two passes differ
        try:
            with torch.no_grad():
                gathered = self._gathered_logits(batch)
                full = self._full_logits(batch)
        finally:
            self.causal_lm.train(was_training)
        model_fp32 = getattr(self.causal_lm, "dtype", None) == torch.float32
        exact = gathered.dtype == full.dtype == torch.float32 and model_fp32
        if gathered.shape == full.shape and _close(gathered.float(), full.float(), exact):
            return True
        warnings.warn(
            f"{type(self.causal_lm).__name__}: logits from the decoder body + output embedding differ from the "
            "model's own logits; computing full logits (slower, more memory)",
            stacklevel=3,
        )
        return False


class _FrozenCast:
    """A frozen `nn.Linear` applied under autocast with its weight cast once, not on every call.

    The copy is remade when the weight changes (another tensor, an in-place write, another dtype).
    Outside autocast, for trainable weights and for any other module, the module is simply called.

    Example:
        >>> head = nn.Linear(4, 3, bias=False).requires_grad_(False)
        >>> x = torch.randn(2, 4)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     torch.equal(_FrozenCast().linear(head, x), head(x))
        True
    """

    def __init__(self) -> None:
        self._key: tuple[int, int, int, torch.dtype] | None = None
        self._weight: torch.Tensor | None = None

    def linear(self, module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """`module(hidden)`, with a frozen plain linear layer's weight cast once per autocast dtype."""
        device_type = hidden.device.type
        weight = getattr(module, "weight", None)
        if (
            type(module) is not nn.Linear
            or not isinstance(weight, torch.Tensor)
            or weight.requires_grad
            or not torch.is_autocast_enabled(device_type)
        ):
            return module(hidden)
        dtype = torch.get_autocast_dtype(device_type)
        if (
            torch.float64 in (weight.dtype, hidden.dtype)
            or not weight.is_floating_point()
            or weight.dtype == dtype
        ):
            return module(hidden)  # nothing to cast (autocast leaves fp64 alone)
        bias = module.bias
        return F.linear(hidden.to(dtype), self._cast(weight, dtype), None if bias is None else bias.to(dtype))

    def _cast(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (id(weight), weight.data_ptr(), weight._version, dtype)
        if self._key != key or self._weight is None:
            self._weight, self._key = None, None  # free the old copy before making the new one
            self._weight, self._key = weight.detach().to(dtype), key
        return self._weight


def _close(gathered: torch.Tensor, full: torch.Tensor, exact: bool) -> bool:
    tolerance = 1e-4 if exact else 2e-2  # bf16/fp16 matmuls round differently for [N, h] and [S, T, h]
    finite = full[torch.isfinite(full)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    close = torch.isclose(gathered, full, rtol=0.0, atol=tolerance * max(scale, 1.0), equal_nan=True)
    return bool(close.all())


def sequence_logps(token_logps: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Sum the target log-probs per sequence: [num_sequences].

    Example:
        >>> from lofit.training.batching import collate
        >>> from lofit.training.encoding import EncodedSequence
        >>> batch = collate([EncodedSequence((5, 6, 7), 1), EncodedSequence((8, 9), 1)], pad_token_id=0)
        >>> sequence_logps(torch.tensor([-1.0, -2.0, -0.5]), batch).tolist()
        [-3.0, -0.5]
    """
    # Scatter into [S, T] (each slot written once) and sum rows: unlike index_add, deterministic on GPU.
    grid = token_logps.new_zeros(batch.input_ids.shape)
    grid = grid.index_put((batch.sequence_index, batch.positions), token_logps)
    return grid.sum(1)
