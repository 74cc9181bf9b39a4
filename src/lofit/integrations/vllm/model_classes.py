"""vLLM model classes that serve many LoFiT adapters: vLLM's own Llama / Qwen2 / Mistral / Qwen3 plus tables.

`lofit_model_class(base)` subclasses one of vLLM's causal LM classes. Its forward first turns the batch's
per-request adapters (`lofit.integrations.vllm.routing`) into one table row per token, using vLLM's
`query_start_loc` from the forward context; a forward pre-hook on every attention output projection
(`self_attn.o_proj`) then edits its input with the token's row of that layer's table
(`ForwardRows.apply`, in place): z + v, or (1 + A) * z + v. Weights load under vLLM's own names (hooks add no
parameter). A batch of base-model requests only skips the tables.

The classes are registered with vLLM's `ModelRegistry` under "Lofit" + the base class name by the
plugin (`lofit.integrations.vllm.plugin`) and chosen with `hf_overrides={"architectures": [...]}`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from ...errors import LofitRuntimeError
from .adapter_files import ServedModel, read_dense_vectors
from .routing import batch_adapters
from .tables import AdapterTables, ForwardRows, UnknownAdapterError

WRAPPED: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


class LofitServing:
    """The adapter state of one served model: its tables, the batch's rows, the projection hooks.

    Args:
        model: the vLLM causal LM (its decoder layers at `model.model.layers`).
        vllm_config: the engine's config.
    """

    def __init__(self, model: nn.Module, vllm_config: VllmConfig) -> None:
        if not vllm_config.model_config.enforce_eager:
            # Compiled graphs (torch.compile, CUDA graphs) would capture the per-token gather of one step.
            raise LofitRuntimeError(
                "the lofit vLLM plugin runs in eager mode: pass enforce_eager=True (--enforce-eager); "
                "LofitEngine and `lofit serve` set it"
            )
        config = vllm_config.model_config.hf_config
        text = getattr(config, "get_text_config", lambda: config)()
        self.instance_id = vllm_config.instance_id
        self.batch = batch_adapters(self.instance_id)
        self.projections: dict[int, nn.Module] = {}
        for index, layer in enumerate(model.model.layers):  # type: ignore[union-attr, arg-type]
            attention = getattr(layer, "self_attn", None)  # absent on other pipeline stages' layers
            if attention is not None:
                self.projections[index] = attention.o_proj
        first = next(iter(self.projections.values()))
        self.served = ServedModel.from_hf_config(text, projection_weight=self._projection_weight)
        width = self.served.num_heads * self.served.head_dim
        shard = int(getattr(first, "input_size_per_partition", width))
        rank = int(getattr(first, "tp_rank", 0))
        self.tables = AdapterTables(
            self.served.num_layers,
            self.served.num_heads,
            self.served.head_dim,
            columns=slice(rank * shard, (rank + 1) * shard),
            device=torch.device(str(first.weight.device)),
        )
        self.token_rows: ForwardRows | None = None
        self._retiring: set[str] = set()  # removed, kept until no request of the batch uses them
        for index, projection in self.projections.items():
            projection.register_forward_pre_hook(self._hook(index))

    # ------------------------------------------------------------------------------ adapters
    @property
    def adapter_names(self) -> list[str]:
        """The registered adapters (removed ones excluded)."""
        return [name for name in self.tables.names if name not in self._retiring]

    def add_adapter(self, name: str, name_or_path: str) -> int:
        """Read, check and register the adapter saved at `name_or_path` as `name`; returns its row.

        Re-adding a name removed while some of its requests still ran gives those requests the new
        vectors from the next step on (the front ends refuse new requests for a removed name at once).
        """
        vectors = read_dense_vectors(name_or_path, self.served)
        if name in self._retiring:
            self._retiring.discard(name)
            self.tables.remove(name)
        return self.tables.add(name, vectors)

    def remove_adapter(self, name: str) -> None:
        """Unregister `name`; its row is freed once no request of the running batch uses it."""
        if name not in self.adapter_names:
            raise UnknownAdapterError(
                f"no adapter named {name!r} is registered; registered: {self.adapter_names}"
            )
        self._retiring.add(name)

    def _free_retired(self, current: list[str | None]) -> None:
        for name in [n for n in self._retiring if n not in current]:
            self.tables.remove(name)
            self._retiring.discard(name)

    def _projection_weight(self, layer: int) -> torch.Tensor | None:
        projection = self.projections.get(layer)
        if projection is None or int(getattr(projection, "tp_size", 1)) != 1:
            return None  # a shard is not the weight the adapter's fingerprint describes
        weight = getattr(projection, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.numel() == 0:
            return None  # vLLM's CPU backend repacks the weight; the front end checks the checkpoint's
        return weight

    # ------------------------------------------------------------------------------ forwards
    def prepare(self) -> None:
        """Set the token rows of this forward from the batch's adapters (None: every row is the base)."""
        self.token_rows = None
        if not is_forward_context_available():
            return
        metadata: Any = get_forward_context().attn_metadata
        if metadata is None:  # a dummy (profiling / warm-up) forward
            return
        if not self.batch.attached:
            raise LofitRuntimeError(
                "lofit's logits processor is not loaded, so requests' adapters are unknown: install lofit "
                "(pip install 'lofit[vllm]') or pass logits_processors=[LofitAdapterRouter]"
            )
        current = self.batch.current()
        if self._retiring:
            self._free_retired(current)
        if self.batch.all_base():
            return
        if isinstance(metadata, list):
            raise LofitRuntimeError("lofit adapters are not supported with micro-batching (ubatches)")
        if isinstance(metadata, dict):
            metadata = next(iter(metadata.values()))
        self.token_rows = ForwardRows(self.tables, self.tables.token_rows(current, metadata.query_start_loc))

    def _hook(self, layer: int) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...] | None]:
        tables = self.tables

        def edit_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            rows = self.token_rows
            if rows is not None and tables.edits_layer(layer):
                rows.apply(layer, args[0])  # in place: the attention output is this projection's alone
            return None

        return edit_input


def lofit_model_class(base: type[nn.Module]) -> type[nn.Module]:
    """A subclass of vLLM's causal LM class `base` that serves lofit adapters (see the module docstring)."""

    class LofitCausalLM(base):  # type: ignore[valid-type, misc]
        def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self.lofit = LofitServing(self, vllm_config)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            self.lofit.prepare()
            try:
                return super().forward(*args, **kwargs)
            finally:
                self.lofit.token_rows = None

    LofitCausalLM.__name__ = LofitCausalLM.__qualname__ = "Lofit" + base.__name__
    return LofitCausalLM


LofitLlamaForCausalLM = lofit_model_class(LlamaForCausalLM)
LofitQwen2ForCausalLM = lofit_model_class(Qwen2ForCausalLM)
LofitMistralForCausalLM = lofit_model_class(MistralForCausalLM)
LofitQwen3ForCausalLM = lofit_model_class(Qwen3ForCausalLM)
