"""Which adapter each request of vLLM's persistent batch uses, kept in step with the batch.

A request names its adapter in `SamplingParams.extra_args["lofit_adapter"]` (the OpenAI server's
`vllm_xargs`; absent: the base model). vLLM V1 tells logits processors, before every forward, which
requests were added to, removed from and moved within its persistent batch (`BatchUpdate`); the plugin's
logits processor (`lofit.integrations.vllm.router`) feeds those updates to a `BatchAdapters`, and the
model's forward reads the adapter of batch row i from it. Rows are in the order vLLM lays the tokens
out (`query_start_loc`), so row i's adapter covers the tokens of request i.

This module is plain Python (no vLLM import), so it is tested on its own.

Example:
    >>> batch = BatchAdapters()
    >>> batch.update(batch_size=2, removed=[], added=[(0, "a"), (1, None)], moved=[])
    >>> batch.update(batch_size=2, removed=[], added=[], moved=[(0, 1, "swap")])
    >>> batch.current()
    [None, 'a']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ...errors import LofitValueError

ADAPTER_KEY = "lofit_adapter"
"""The `extra_args` / `vllm_xargs` key that names a request's adapter."""


def adapter_of(extra_args: Mapping[str, Any] | None) -> str | None:
    """The adapter a request's `extra_args` names (None: the base model).

    Example:
        >>> adapter_of({"lofit_adapter": "math"}), adapter_of(None)
        ('math', None)
    """
    if not extra_args or extra_args.get(ADAPTER_KEY) is None:
        return None
    name = extra_args[ADAPTER_KEY]
    if not isinstance(name, str) or not name:
        raise LofitValueError(f"extra_args[{ADAPTER_KEY!r}] must be an adapter name (a string), got {name!r}")
    return name


class BatchAdapters:
    """The adapter name (or None) of each row of vLLM's persistent batch."""

    def __init__(self) -> None:
        self._rows: dict[int, str | None] = {}
        self.batch_size = 0
        self._owner: object | None = None

    def attach(self, owner: object) -> bool:
        """Make `owner` (a logits processor) the one that updates this state; False if another is.

        vLLM builds the plugin's processor once per entry point and once per `logits_processors=` entry;
        only the first may apply the batch updates (a second would apply each move twice).
        """
        if self._owner is None:
            self._owner = owner
        return self._owner is owner

    @property
    def attached(self) -> bool:
        """Whether a logits processor keeps this state up to date."""
        return self._owner is not None

    def update(
        self,
        batch_size: int,
        removed: Iterable[int],
        added: Iterable[tuple[int, str | None]],
        moved: Iterable[tuple[int, int, str]],
    ) -> None:
        """Apply one batch update, in vLLM's order: removals, additions, then moves.

        Args:
            batch_size: rows in the batch after the update.
            removed: indices of removed requests.
            added: (index, adapter) of added requests (an addition may replace the row's request).
            moved: (a, b, kind) with kind "swap" (a <-> b) or anything else for a one-way move a -> b.
        """
        for index in removed:
            self._rows.pop(index, None)
        for index, name in added:
            self._rows[index] = name
        for first, second, kind in moved:
            a, b = self._rows.pop(first, None), self._rows.pop(second, None)
            if kind == "swap":
                self._rows[first] = b
            self._rows[second] = a
        self.batch_size = batch_size

    def current(self) -> list[str | None]:
        """The adapter of rows 0..batch_size-1 (None: base model)."""
        return [self._rows.get(i) for i in range(self.batch_size)]

    def all_base(self) -> bool:
        """Whether no row of the batch uses an adapter (the forward then skips every table)."""
        return all(self._rows.get(i) is None for i in range(self.batch_size))


_BATCHES: dict[str, BatchAdapters] = {}


def batch_adapters(instance_id: str) -> BatchAdapters:
    """The `BatchAdapters` of the engine whose `VllmConfig.instance_id` is `instance_id` (one per engine)."""
    return _BATCHES.setdefault(instance_id, BatchAdapters())


def forget_engine(instance_id: str) -> None:
    """Drop an engine's batch state (when its model is freed)."""
    _BATCHES.pop(instance_id, None)
