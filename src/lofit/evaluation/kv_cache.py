"""Reuse one KV cache for many continuations without copying it up front or mutating it."""

from __future__ import annotations

import copy
from typing import Any


def fork_cache(cache: Any, batch_size: int) -> Any:
    """A new cache holding `cache`'s states repeated `batch_size` times along the batch; `cache` stays intact.

    Dynamic cache layers grow by `torch.cat`, which writes new tensors and never into the old ones, so
    the fork can start from zero-copy `expand` views of the shared states (the first forward through the
    fork materialises them). Caches without `layers` (older transformers) are deep-copied instead.
    """
    if not hasattr(cache, "layers"):
        fork = copy.deepcopy(cache)
        if batch_size != 1:
            fork.batch_repeat_interleave(batch_size)
        return fork
    fork = copy.copy(cache)
    fork.layers = []
    for layer in cache.layers:
        forked = copy.copy(layer)
        keys = getattr(layer, "keys", None)
        if getattr(layer, "is_initialized", False) and keys is not None and keys.numel() > 0:
            if keys.shape[0] != 1:
                raise ValueError(f"fork_cache needs a batch-1 cache, got batch {keys.shape[0]}")
            forked.keys = keys.expand(batch_size, *keys.shape[1:])
            forked.values = layer.values.expand(batch_size, *layer.values.shape[1:])
        fork.layers.append(forked)
    return fork
