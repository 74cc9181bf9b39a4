"""Reuse KV caches for many continuations without mutating them.

Dynamic cache layers grow by `torch.cat`, which writes new tensors and never into the old ones, so a
new cache object whose layers point at (views of) the shared states can be extended freely while the
shared cache stays intact. Caches without `layers` (older transformers) are deep-copied instead.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def fork_cache(cache: Any, batch_size: int) -> Any:
    """A new cache holding the batch-1 `cache`'s states repeated `batch_size` times (zero-copy views).

    Args:
        cache: a transformers cache of batch size 1 (a shared prefix).
        batch_size: how many rows the new cache has.

    Returns:
        The new cache; `cache` itself is not changed.
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


def select_cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A new cache whose batch row i holds `cache`'s row `rows[i]`; `cache` stays intact.

    Args:
        cache: a transformers cache.
        rows: batch indices into `cache`, [n].

    Returns:
        The new cache of batch size n.
    """
    if not hasattr(cache, "layers"):
        fork = copy.deepcopy(cache)
        fork.batch_select_indices(rows)
        return fork
    fork = copy.copy(cache)
    fork.layers = []
    for layer in cache.layers:
        forked = copy.copy(layer)
        keys = getattr(layer, "keys", None)
        if getattr(layer, "is_initialized", False) and keys is not None and keys.numel() > 0:
            forked.keys = keys[rows.to(keys.device)]
            forked.values = layer.values[rows.to(keys.device)]
        fork.layers.append(forked)
    return fork
