"""The served adapters of one engine: per-layer tables of dense head vectors, one row per adapter.

For every decoder layer the tables hold each registered adapter's dense offset v ([num_heads * head_dim],
zeros on heads it does not edit) and, when some adapter learns one, its dense factor 1 + A (ones
elsewhere). Row 0 is the identity (the base model). A forward gathers one row per token and edits the
attention output projection's input exactly as `lofit.adapters.layer.RowVectors.apply` does for a mixed
batch in transformers: `z + v`, or `((1 + A) * z.float() + v).to(z.dtype)` when a scale is present.

This module knows nothing of vLLM; `lofit.integrations.vllm.model_classes` owns one `AdapterTables` per engine.

Example:
    >>> import torch
    >>> tables = AdapterTables(num_layers=2, num_heads=2, head_dim=2)
    >>> tables.add("a", {1: DenseVectors(offset=torch.tensor([0.0, 0.0, 1.0, 1.0]), scale=None)})
    1
    >>> rows = tables.token_rows(["a", None], torch.tensor([0, 2, 3]))  # request 0: 2 tokens, 1: 1 token
    >>> rows.tolist()
    [1, 1, 0]
    >>> tables.apply(1, torch.zeros(3, 4), rows).tolist()
    [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import LofitRuntimeError, LofitValueError


class UnknownAdapterError(LofitRuntimeError):
    """A request names an adapter that this engine has not registered."""


@dataclass
class DenseVectors:
    """One adapter's edit of one layer: `offset` v and/or `scale` 1 + A, each [num_heads * head_dim] fp32."""

    offset: torch.Tensor | None
    scale: torch.Tensor | None


class AdapterTables:
    """Dense per-layer tables of the registered adapters (row 0: no adapter), grown on demand.

    Args:
        num_layers: decoder layers of the base model.
        num_heads: attention heads feeding each output projection.
        head_dim: width of one head's slice of the projection input.
        columns: the slice of the projection input this process holds (tensor parallelism shards the
            input of the output projection by heads); None for the whole input.
        device: where the tables live (the model's device).
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        columns: slice | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_layers = num_layers
        self.width = num_heads * head_dim
        self.columns = columns or slice(0, self.width)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        local = len(range(self.width)[self.columns])
        self.offset = torch.zeros(num_layers, 1, local, dtype=torch.float32, device=self.device)
        self.scale: torch.Tensor | None = None  # allocated with the first adapter that learns a scale
        self.rows: dict[str, int] = {}
        self._free: list[int] = []  # unused rows (row 0, the identity, is never free)
        self._edited: dict[str, list[int]] = {}  # adapter -> the layers it edits
        self._layer_users = [0] * num_layers  # adapters editing each layer; 0: the layer is skipped
        self._cast: dict[torch.dtype, torch.Tensor] = {}  # the offset table in other dtypes (offset_as)

    # --------------------------------------------------------------------------- registration
    @property
    def names(self) -> list[str]:
        """The registered adapter names, in registration order."""
        return list(self.rows)

    def bytes_per_adapter(self) -> int:
        """Table memory one adapter row takes (offset, plus scale once any adapter has one)."""
        per_table = self.num_layers * self.offset.shape[-1] * self.offset.element_size()
        return per_table * (2 if self.scale is not None else 1)

    def add(self, name: str, layers: dict[int, DenseVectors]) -> int:
        """Register `name` with its per-layer vectors; returns its row. The name must be new."""
        if name in self.rows:
            raise LofitValueError(f"an adapter named {name!r} is registered already; remove it first")
        bad = [layer for layer in layers if not 0 <= layer < self.num_layers]
        if bad:
            raise LofitValueError(
                f"adapter {name!r} edits layer(s) {bad}; the served model has layers 0..{self.num_layers - 1}"
            )
        if not self._free:
            self._grow()
        row = self._free.pop()
        self._cast.clear()
        if any(v.scale is not None for v in layers.values()) and self.scale is None:
            self.scale = torch.ones_like(self.offset)
        with torch.no_grad():
            for layer, vectors in layers.items():
                if vectors.offset is not None:
                    self.offset[layer, row] = vectors.offset[self.columns].to(self.offset)
                if vectors.scale is not None:
                    assert self.scale is not None
                    self.scale[layer, row] = vectors.scale[self.columns].to(self.scale)
                self._layer_users[layer] += 1
        self.rows[name] = row
        self._edited[name] = sorted(layers)
        return row

    def remove(self, name: str) -> None:
        """Unregister `name`; its row is reset to the identity and reused by the next `add`."""
        if name not in self.rows:
            raise UnknownAdapterError(f"no adapter named {name!r} is registered; registered: {self.names}")
        row = self.rows.pop(name)
        self._cast.clear()
        with torch.no_grad():
            self.offset[:, row] = 0.0
            if self.scale is not None:
                self.scale[:, row] = 1.0
        for layer in self._edited.pop(name):
            self._layer_users[layer] -= 1
        self._free.append(row)

    def _grow(self) -> None:
        """Double the tables' rows (a copy: the rows registered so far keep their index)."""
        capacity = self.offset.shape[1]
        self.offset = _grown(self.offset, 2 * capacity, 0.0)
        if self.scale is not None:
            self.scale = _grown(self.scale, 2 * capacity, 1.0)
        self._free.extend(reversed(range(capacity, 2 * capacity)))  # pop() takes the lowest first

    # ------------------------------------------------------------------------------ forwards
    def token_rows(self, request_adapters: list[str | None], query_start_loc: torch.Tensor) -> torch.Tensor:
        """One table row per token: request i's adapter row for its tokens (0 for the base and padding).

        Args:
            request_adapters: the adapter of each request of the batch, in batch order (None: base).
            query_start_loc: [num_requests + 1] cumulative token offsets of the requests (vLLM's).

        Returns:
            A long tensor [query_start_loc[-1]] on the tables' device.
        """
        rows = []
        for name in request_adapters:
            if name is None:
                rows.append(0)
                continue
            row = self.rows.get(name)
            if row is None:
                raise UnknownAdapterError(
                    f"a request names lofit adapter {name!r}, which this engine has not registered; "
                    f"registered: {self.names}. Register it first (LofitAdapters.add or --adapter NAME=PATH)"
                )
            rows.append(row)
        starts = query_start_loc[: len(rows) + 1].to("cpu", torch.long)
        counts = starts[1:] - starts[:-1]
        per_request = torch.tensor(rows, dtype=torch.long)
        return per_request.repeat_interleave(counts).to(self.device)

    def edits_layer(self, layer: int) -> bool:
        """Whether any registered adapter edits `layer` (other layers are left untouched)."""
        return self._layer_users[layer] > 0

    def apply(self, layer: int, hidden: torch.Tensor, token_rows: torch.Tensor) -> torch.Tensor:
        """Edit the projection input `hidden` [tokens, width] of `layer` in place, token t with row token_rows[t].

        Tokens past `len(token_rows)` (padding of the forward's batch) are left as they are. Returns
        `hidden`. A forward that edits several layers uses one `ForwardRows`, which shares its scratch.
        """
        return ForwardRows(self, token_rows).apply(layer, hidden)

    def offset_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The offset table in `dtype` (cached until the next add / remove): `z + v` adds v in z's dtype."""
        if dtype == self.offset.dtype:
            return self.offset
        cast = self._cast.get(dtype)
        if cast is None:
            cast = self._cast[dtype] = self.offset.to(dtype)
        return cast


class ForwardRows:
    """One forward's table row per token, and the scratch its layers' gathers share (no per-layer allocation).

    `apply` edits a projection input in place: vLLM's attention writes each layer's output into a tensor
    of its own (`torch.empty` per call) that only the output projection reads, so nothing else sees the edit.

    Args:
        tables: the engine's tables.
        rows: [tokens] long, each token's row (`AdapterTables.token_rows`).
    """

    def __init__(self, tables: AdapterTables, rows: torch.Tensor) -> None:
        self.tables = tables
        self.rows = rows
        self._scratch: dict[tuple[torch.dtype, int], torch.Tensor] = {}

    def _gather(self, table: torch.Tensor, slot: int) -> torch.Tensor:
        """Rows `self.rows` of `table` [rows, width], written into this forward's scratch `slot`."""
        key = (table.dtype, slot)
        out = self._scratch.get(key)
        if out is None:
            out = torch.empty(self.rows.shape[0], table.shape[-1], dtype=table.dtype, device=table.device)
            self._scratch[key] = out
        return torch.index_select(table, 0, self.rows, out=out)

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Edit `hidden` [tokens, width] of `layer` in place (tokens past the rows: padding, untouched)."""
        tables = self.tables
        edited = hidden[: self.rows.shape[0]]
        if tables.scale is None:
            edited.add_(self._gather(tables.offset_as(hidden.dtype)[layer], 0))
            return hidden
        # As lofit's scale path: 1 + A is applied in fp32 (in bf16, 1 + 1e-3 rounds to 1).
        work = edited.float()  # `edited` itself when it is fp32
        work.mul_(self._gather(tables.scale[layer], 1)).add_(self._gather(tables.offset[layer], 2))
        if work is not edited:
            edited.copy_(work)
        return hidden


def _grown(table: torch.Tensor, rows: int, fill: float) -> torch.Tensor:
    layers, old, width = table.shape
    grown = torch.full((layers, rows, width), fill, dtype=table.dtype, device=table.device)
    grown[:, :old] = table
    return grown
