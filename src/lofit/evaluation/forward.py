"""Running the model for evaluation: the causal LM behind a wrapper, its device, eval mode without
autograd, and forward calls that continue a KV cache (tokenisation lives in `tokens.py`)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM behind `model` (a `LofitModel` wraps one; its forward passes through).

    Args:
        model: a causal LM or a `LofitModel`.

    Returns:
        The causal LM module.
    """
    from ..adapters.model import LofitModel

    return model.get_base_model() if isinstance(model, LofitModel) else model


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where inputs go).

    Args:
        model: any module with parameters.

    Returns:
        Its device.
    """
    return next(model.parameters()).device


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the block; the model's training flag is restored after.

    Args:
        model: the model to run.

    Example:
        >>> from torch import nn
        >>> layer = nn.Linear(2, 2).train()
        >>> with inference(layer):
        ...     layer.training
        False
        >>> layer.training
        True
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def cache_kwarg(model: nn.Module) -> str:
    """The forward keyword for the KV cache: `cache` in recent transformers, `past_key_values` before.

    Args:
        model: a causal LM or a `LofitModel`.

    Returns:
        The keyword's name.
    """
    parameters = inspect.signature(type(causal_lm(model)).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def forward(
    model: nn.Module, input_ids: torch.Tensor, cache: Any = None, **extra: Any
) -> tuple[torch.Tensor, Any]:
    """Run `model` on `input_ids`, continuing `cache`.

    Args:
        model: a causal LM or a `LofitModel`.
        input_ids: token ids, [batch, length].
        cache: a KV cache from an earlier call, or None to start from scratch.
        **extra: more forward keywords (attention_mask, position_ids, ...).

    Returns:
        `(logits, the updated cache)`.
    """
    kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": True, **extra}
    if cache is not None:
        kwargs[cache_kwarg(model)] = cache
    output = model(**kwargs)
    new_cache = getattr(output, "cache", None)
    if new_cache is None:
        new_cache = getattr(output, "past_key_values", None)
    return output.logits, new_cache


def sliding_window(model: nn.Module) -> int | None:
    """The model's attention window if its config declares one.

    Args:
        model: a causal LM or a `LofitModel`.

    Returns:
        The window in tokens, or None for full attention everywhere.
    """
    config: Any = causal_lm(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text_config, "sliding_window", None)
    return window if isinstance(window, int) else None


@dataclass(frozen=True)
class SplitModel:
    """A causal LM as its decoder body and its output embedding, to apply the LM head only where needed.

    `project(hidden)` equals the model's own logits at those positions (checked by `split_model`); a
    262k-vocabulary head (Gemma 3) costs more than the whole body per position, so scoring gathers the
    positions it scores first.
    """

    decoder: nn.Module
    head: nn.Module
    softcap: float | None

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states [..., hidden] -> [..., vocab]."""
        logits = self.head(hidden)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def forward(self, input_ids: torch.Tensor, cache: Any = None, **extra: Any) -> tuple[torch.Tensor, Any]:
        """`(last hidden states [batch, length, hidden], the updated cache)`, continuing `cache`."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": True, **extra}
        if cache is not None:
            parameters = inspect.signature(type(self.decoder).forward).parameters
            kwargs["cache" if "cache" in parameters else "past_key_values"] = cache
        output = self.decoder(**kwargs)
        new_cache = getattr(output, "cache", None)
        if new_cache is None:
            new_cache = getattr(output, "past_key_values", None)
        return output[0], new_cache


def split_model(model: nn.Module, probe_ids: list[int]) -> SplitModel | None:
    """The decoder body and LM head of `model`, or None where they do not reproduce its logits.

    Runs `probe_ids` (a few tokens) both ways once: a model whose forward does more than
    `head(decoder(x))` (a logit scale, say) keeps the full-logits path.

    Args:
        model: a causal LM or a model wrapping one (`LofitModel`: its adapter stays active in the body).
        probe_ids: token ids to check on (at least one).

    Returns:
        The `SplitModel`, or None.
    """
    from ..training.trainable import causal_lm_of

    lm = causal_lm_of(model)
    get_decoder, get_head = getattr(lm, "get_decoder", None), getattr(lm, "get_output_embeddings", None)
    if not callable(get_decoder) or not callable(get_head):
        return None
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if not isinstance(decoder, nn.Module) or decoder is lm or not isinstance(head, nn.Module):
        return None
    cap = getattr(getattr(lm, "config", None), "final_logit_softcapping", None)
    split = SplitModel(decoder, head, cap if isinstance(cap, (int, float)) else None)
    ids = torch.tensor([probe_ids], device=device_of(model))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits.float()
        gathered = split.project(split.forward(ids)[0]).float()
    if gathered.shape != full.shape:
        return None
    # under autocast (`evaluate(precision="bf16")`) the two paths round differently
    exact = next(lm.parameters()).dtype == torch.float32 and not torch.is_autocast_enabled(ids.device.type)
    tolerance = 1e-4 if exact else 2e-2
    finite = full[torch.isfinite(full)]
    scale = max(float(finite.abs().max()) if finite.numel() else 1.0, 1.0)
    close = torch.isclose(gathered, full, rtol=0.0, atol=tolerance * scale, equal_nan=True)
    return split if bool(close.all()) else None
