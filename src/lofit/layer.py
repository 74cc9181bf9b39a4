"""The per-layer adapter: a wrapper around the attention output projection that edits its input.

For the heads it adapts, each head's slice z of the projection input becomes (1 + A) ⊙ z + v. The
per-head vectors are stored only for the selected heads ([K, head_dim]) and scattered into one dense
[num_heads * head_dim] vector per forward, so the edit is a single broadcast multiply-add over the
activations: no Python loop over heads, and untouched heads see exactly x * 1 + 0.
"""

from __future__ import annotations

import torch
from torch import nn

from .heads import module_tensor
from .wrappers import Fp32Parameters


class HeadVectors(Fp32Parameters):
    """One adapter's vectors for one layer: `heads` [K], `scale` A [K, d] and/or `offset` v [K, d] in fp32."""

    heads: torch.Tensor

    def __init__(
        self,
        heads: list[int],
        num_heads: int,
        head_dim: int,
        use_scale: bool,
        use_offset: bool,
        init_std: float,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.register_buffer("heads", torch.tensor(heads, dtype=torch.long, device=device))
        shape = (len(heads), head_dim)
        self.scale = self._init_vector(shape, init_std, device) if use_scale else None
        self.offset = self._init_vector(shape, init_std, device) if use_offset else None
        # Without autograd (inference) the dense vectors are built once and reused until a vector changes.
        self._dense_cache: tuple[tuple[object, ...], torch.Tensor | None, torch.Tensor | None] | None = None

    @staticmethod
    def _init_vector(shape: tuple[int, int], std: float, device: torch.device | None) -> nn.Parameter:
        values = torch.zeros(shape, dtype=torch.float32, device=device)
        if std > 0:
            values.normal_(0.0, std)
        return nn.Parameter(values)

    def dense_scale(self) -> torch.Tensor | None:
        """The factor 1 + A for every input feature ([num_heads * head_dim], ones on untouched heads)."""
        if self.scale is None:
            return None
        ones = torch.ones(self.num_heads, self.head_dim, dtype=torch.float32, device=self.scale.device)
        return ones.index_copy(0, self.heads, 1.0 + self.scale).flatten()

    def dense_offset(self) -> torch.Tensor | None:
        """v for every input feature ([num_heads * head_dim], zeros on untouched heads)."""
        if self.offset is None:
            return None
        zeros = torch.zeros(self.num_heads, self.head_dim, dtype=torch.float32, device=self.offset.device)
        return zeros.index_copy(0, self.heads, self.offset).flatten()

    def _cached_dense(self, hidden: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(offset, scale) as `forward` uses them, rebuilt only when a vector is changed or moved.

        In-place updates (optimizer steps, `set_head_params`, `load_state_dict`) bump a tensor's version
        counter and `.data` replacement changes its storage, so both are part of the key.
        """
        tensors = [t for t in (self.heads, self.scale, self.offset) if t is not None]
        key = (hidden.dtype, hidden.device, *((t.data_ptr(), t._version) for t in tensors))
        if self._dense_cache is None or self._dense_cache[0] != key:
            offset, scale = self.dense_offset(), self.dense_scale()
            if offset is not None and scale is None:
                offset = offset.to(hidden.dtype)
            self._dense_cache = (key, offset, scale)
        return self._dense_cache[1], self._dense_cache[2]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Trainable vectors are never cached: fused optimizers (torch's AdamW(fused=True), transformers'
        # default "adamw_torch_fused") update them in place without bumping the version counter.
        trainable = any(p is not None and p.requires_grad for p in (self.scale, self.offset))
        if torch.is_grad_enabled() or trainable:
            offset, scale = self.dense_offset(), self.dense_scale()
        else:
            offset, scale = self._cached_dense(hidden)
        if scale is None:
            assert offset is not None
            return hidden + offset.to(hidden.dtype)
        # 1 + A is computed and applied in fp32: in bf16, 1 + 1e-3 rounds to 1.
        scaled = hidden.float() * scale
        if offset is not None:
            scaled = scaled + offset
        return scaled.to(hidden.dtype)


class LofitProjection(nn.Module):
    """Wraps an attention output projection; applies the active adapter's head vectors to its input."""

    def __init__(self, base_layer: nn.Module, layer_index: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.lofit_adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.adapter_disabled = False

    @property
    def weight(self) -> torch.Tensor:
        return module_tensor(self.base_layer, "weight")

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.base_layer.bias is None else module_tensor(self.base_layer, "bias")

    def active_vectors(self) -> HeadVectors | None:
        if (
            self.adapter_disabled
            or self.active_adapter is None
            or self.active_adapter not in self.lofit_adapters
        ):
            return None
        vectors = self.lofit_adapters[self.active_adapter]
        assert isinstance(vectors, HeadVectors)
        return vectors

    def forward(self, hidden: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        vectors = self.active_vectors()
        if vectors is not None:
            hidden = vectors(hidden)
        return self.base_layer(hidden, *args, **kwargs)
