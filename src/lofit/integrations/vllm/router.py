"""The plugin's vLLM logits processor: it changes no logit, it tracks each batch row's adapter.

vLLM V1 calls `update_state` with the persistent batch's changes before every forward (documented in
`vllm.v1.sample.logits_processor.interface`). The processor records each added request's adapter
(`extra_args["lofit_adapter"]`) in the engine's `BatchAdapters`, which the wrapped model reads in its
forward. It is registered under vLLM's `vllm.logits_processors` entry point group, so every engine in an
environment with lofit installed builds one; engines that serve no lofit model never read it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .routing import adapter_of, batch_adapters

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig


class LofitAdapterRouter(LogitsProcessor):
    """Keeps `lofit.integrations.vllm.routing.BatchAdapters` in step with vLLM's persistent batch.

    Args:
        vllm_config: the engine's config (its `instance_id` names the engine's batch state).
        device: unused (nothing runs on the device).
        is_pin_memory: unused.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.batch = batch_adapters(vllm_config.instance_id)
        self.active = self.batch.attach(self)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Refuse a malformed adapter name before the request reaches the engine (HTTP 400)."""
        try:
            adapter_of(sampling_params.extra_args)
        except ValueError as error:
            raise ValueError(str(error)) from None

    def is_argmax_invariant(self) -> bool:
        return True  # logits are never changed

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None or not self.active:
            return
        self.batch.update(
            batch_update.batch_size,
            removed=batch_update.removed,
            added=[(index, adapter_of(params.extra_args)) for index, params, _, _ in batch_update.added],
            moved=[
                (a, b, "swap" if kind == MoveDirectionality.SWAP else "move")
                for a, b, kind in batch_update.moved
            ],
        )
