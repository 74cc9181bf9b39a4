"""The per-layer adapter: a wrapper around the attention output projection that edits its input.

For the heads it adapts, each head's slice z of the projection input becomes (1 + A) ⊙ z + v. The
per-head vectors are stored only for the selected heads ([K, head_dim]) and scattered into one dense
[num_heads * head_dim] vector per forward, so the edit is a single broadcast multiply-add over the
activations: no Python loop over heads, and untouched heads see exactly x * 1 + 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LofitRuntimeError
from .base import AdapterLayer
from .folding import MergeError, fold_input_edit, refusal_for_scale
from .wrappers import Fp32Parameters


class HeadVectors(Fp32Parameters):
    """One adapter's vectors for one layer: `heads` [K], `scale` A [K, d] and/or `offset` v [K, d] in fp32.

    Args:
        heads: the K head indices it edits.
        num_heads: heads in the layer.
        head_dim: width d of one head.
        use_scale: learn A.
        use_offset: learn v.
        init_std: N(0, init_std) initialisation (0.0: exact identity).
        device: where to allocate.

    Example:
        >>> import torch
        >>> vectors = HeadVectors([1], num_heads=2, head_dim=2, use_scale=False, use_offset=True, init_std=0.0)
        >>> with torch.no_grad():
        ...     _ = vectors.offset.fill_(0.5)
        >>> vectors(torch.zeros(1, 4)).tolist()    # only head 1's slice moves
        [[0.0, 0.0, 0.5, 0.5]]
    """

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
        self._held_calls = 0  # > 0 inside `vectors_held_fixed`: nothing can change the vectors then

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
        # Inside `vectors_held_fixed` (one `generate` call) no optimizer runs, so the cache is safe then.
        trainable = any(p is not None and p.requires_grad for p in (self.scale, self.offset))
        if torch.is_grad_enabled() or (trainable and not self._held_calls):
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


@contextlib.contextmanager
def vectors_held_fixed(model: nn.Module) -> Iterator[None]:
    """A block (one `generate` call) in which no adapter vector changes: dense vectors are built once.

    Outside such a block trainable vectors are rebuilt at every forward, since fused optimizers update
    them in place without a trace; inside it, the many forwards of one generation reuse one build. The
    cache is dropped on exit. Blocks nest.

    Example:
        >>> import torch
        >>> vectors = HeadVectors([0], num_heads=1, head_dim=2, use_scale=False, use_offset=True, init_std=0.1)
        >>> with torch.no_grad(), vectors_held_fixed(vectors):
        ...     first, again = vectors(torch.zeros(1, 2)), vectors(torch.zeros(1, 2))
        >>> vectors._dense_cache is None, bool(torch.equal(first, again))
        (True, True)
    """
    held = [module for module in model.modules() if isinstance(module, HeadVectors)]
    for vectors in held:
        vectors._held_calls += 1
    try:
        yield
    finally:
        for vectors in held:
            vectors._held_calls -= 1
            if not vectors._held_calls:
                vectors._dense_cache = None


@dataclass
class RowVectors:
    """One projection's per-row edit: `offset` [B, 1, F] and/or `scale` (1 + A) [B, 1, F], fp32 (None: absent)."""

    offset: torch.Tensor | None
    scale: torch.Tensor | None

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply row i's vectors to row i of `hidden` ([B, ..., F], batch first)."""
        reference = self.offset if self.offset is not None else self.scale
        if reference is None:  # no row's adapter edits this layer
            return hidden
        rows = reference.shape[0]
        if hidden.shape[0] != rows:
            raise LofitRuntimeError(
                f"adapter_names gives {rows} row(s) but a forward inside the call got a batch of "
                f"{hidden.shape[0]}; mixed-adapter batches support plain, sampled and beam-search "
                "generation (not assisted or other decoding that changes the batch); run those per adapter"
            )
        shape = (rows,) + (1,) * (hidden.dim() - 2) + (hidden.shape[-1],)
        if self.scale is None:
            assert self.offset is not None
            return hidden + self.offset.view(shape).to(hidden.dtype)
        scaled = hidden.float() * self.scale.view(shape)
        if self.offset is not None:
            scaled = scaled + self.offset.view(shape)
        return scaled.to(hidden.dtype)


class LofitProjection(AdapterLayer):
    """Wraps an attention output projection; applies the active adapter's head vectors to its input.

    Args:
        base_layer: the projection (nn.Linear, GPT-2's Conv1D, a quantised or a PEFT LoRA layer).
        layer_index: the decoder layer it belongs to.
        num_heads: heads feeding the projection.
        head_dim: width of each head's slice of the input.

    Example:
        >>> import torch
        >>> layer = LofitProjection(torch.nn.Linear(8, 4), layer_index=0, num_heads=2, head_dim=4)
        >>> layer.lofit_adapters["default"] = HeadVectors([1], 2, 4, False, True, init_std=0.1)
        >>> layer.active_adapter = "default"
        >>> x = torch.randn(3, 8)
        >>> adapted = layer(x)
        >>> layer.merge()                      # fold the offset into the bias; forward is the plain layer
        >>> bool(torch.allclose(layer(x), adapted, atol=1e-6))
        True
        >>> layer.unmerge()                    # the original weight and bias, bit for bit
        >>> layer.bias is not None             # nn.Linear had a bias already
        True
    """

    def __init__(self, base_layer: nn.Module, layer_index: int, num_heads: int, head_dim: int) -> None:
        super().__init__(base_layer, layer_index)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.lofit_adapters = nn.ModuleDict()
        self.row_vectors: RowVectors | None = None  # set inside `lofit.adapters.mixed_batch.mixed_adapters`

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.lofit_adapters

    def vectors(self, adapter_name: str) -> HeadVectors:
        vectors = self.lofit_adapters[adapter_name]
        assert isinstance(vectors, HeadVectors)
        return vectors

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        if adapter_name not in self.lofit_adapters:
            return []
        vectors = self.vectors(adapter_name)
        return [p for p in (vectors.scale, vectors.offset) if p is not None]

    def active_vectors(self) -> HeadVectors | None:
        """The vectors forward applies now (None when disabled, merged or without the active adapter)."""
        if not self.applies_adapter():
            return None
        assert self.active_adapter is not None
        return self.vectors(self.active_adapter)

    def refusal(self, adapter_name: str) -> MergeError | None:
        """Why `adapter_name` cannot be folded into this projection (None if it can)."""
        if adapter_name not in self.lofit_adapters or self.vectors(adapter_name).scale is None:
            return None
        return refusal_for_scale(self.base_layer)

    def _fold(self, adapter_name: str) -> None:
        vectors = self.vectors(adapter_name)
        fold_input_edit(self.base_layer, vectors.dense_scale(), vectors.dense_offset())

    def forward(self, hidden: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if self.row_vectors is not None:  # a mixed-adapter batch: row i gets its own adapter
            return self.base_layer(self.row_vectors.apply(hidden), *args, **kwargs)
        vectors = self.active_vectors()
        if vectors is not None:
            hidden = vectors(hidden)
        return self.base_layer(hidden, *args, **kwargs)
