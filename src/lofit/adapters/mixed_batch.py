"""Mixed-adapter batches: one named adapter per row of a batch (PEFT's `adapter_names=` convention).

`LofitModel.forward(..., adapter_names=[...])` and `LofitModel.generate(..., adapter_names=[...])` take
one adapter name per row (`"__base__"`: no adapter). For LoFiT an adapter is a dense offset (and scale)
vector per layer, so a mixed batch is a gather and an add: for each wrapped projection the rows' dense
vectors are gathered once from a [num_adapters + 1, num_heads * head_dim] table (row 0 is the identity)
into a [batch, 1, num_heads * head_dim] tensor, and every forward inside the call (every decoding step of
`generate`, with or without a KV cache) applies row i's vector to row i.

Rows with an offset-only adapter see exactly what running them alone gives (the same add). When an
adapter in the batch learns a scale, every row is computed in fp32 as (1 + A) * z + v (identity for the
others), as the single-adapter scale path does; in fp32 that is exact for every row, in half precision
the offset-only rows may differ from their solo run by one rounding.

This is inference only, like PEFT's: the model must be in eval mode, no adapter may be merged and the
adapter layers must be enabled. `generate` expands the batch for beams / `num_return_sequences`
(`repeat_interleave`), and the row vectors are expanded the same way.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from lofit import LofitConfig, get_lofit_model
    >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    >>> model = get_lofit_model(base, LofitConfig(heads={0: [1]}, init_std=0.5), "a").eval()
    >>> model.add_adapter("b", LofitConfig(heads={1: [2]}, init_std=0.5))
    >>> ids = torch.tensor([[5, 6, 7], [5, 6, 7], [5, 6, 7]])
    >>> mixed = model(input_ids=ids, adapter_names=["a", "b", "__base__"]).logits
    >>> model.set_adapter("b")
    >>> bool(torch.equal(mixed[1], model(input_ids=ids).logits[1]))
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import LofitRuntimeError, LofitValueError
from .layer import HeadVectors, LofitProjection, RowVectors

BASE_NAME = "__base__"
"""The name that selects no adapter for a row (PEFT's convention)."""


class MixedBatchError(LofitValueError):
    """`adapter_names` does not fit the model or the batch; the message says what to change."""


class MixedModel(Protocol):
    """What this module uses of `lofit.adapters.model.LofitModel` (which imports this module)."""

    model: nn.Module
    training: bool

    @property
    def adapter_names(self) -> list[str]: ...

    def projections(self) -> list[LofitProjection]: ...


def check_adapter_names(model: MixedModel, adapter_names: object, batch_size: int | None) -> list[str]:
    """Validate `adapter_names` against the model's adapters and the batch; return them as a list.

    Args:
        model: the `LofitModel`.
        adapter_names: one name per row (`"__base__"` for none).
        batch_size: the batch's row count (None when it cannot be read from the inputs).

    Returns:
        The names as a list of strings.
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise MixedBatchError(
            f"adapter_names must be a list with one adapter name per row, got {adapter_names!r}"
        )
    names = list(adapter_names)
    known = set(model.adapter_names)
    unknown = sorted({str(n) for n in names if not isinstance(n, str) or (n not in known and n != BASE_NAME)})
    if unknown:
        raise MixedBatchError(
            f"adapter_names has unknown adapter name(s) {unknown}; this model has {model.adapter_names} "
            f"(and {BASE_NAME!r} for no adapter)"
        )
    if batch_size is not None and len(names) != batch_size:
        raise MixedBatchError(
            f"adapter_names has {len(names)} name(s) but the batch has {batch_size} row(s); give one per row"
        )
    if not names:
        raise MixedBatchError("adapter_names is empty; give one adapter name per row")
    return names


def _check_state(model: MixedModel) -> None:
    if model.training or model.model.training:
        raise LofitRuntimeError(
            "adapter_names is for inference only (as in PEFT): call model.eval() first; to train several "
            "adapters, train each with set_adapter()"
        )
    layers = model.projections()
    if any(p.merged for p in layers):
        raise LofitRuntimeError(
            "adapter_names cannot be used while an adapter is merged; call model.unmerge_adapter() first"
        )
    if any(p.adapter_disabled for p in layers):
        raise LofitRuntimeError(
            "adapter_names cannot be used while the adapter layers are disabled; call "
            "model.enable_adapter_layers() (or leave the disable_adapter() block), or pass '__base__' rows"
        )


def _row_vectors(projection: LofitProjection, names: list[str], expand: int, device: Any) -> RowVectors:
    """Gather the rows' dense vectors for one projection from its [adapters + 1, F] table."""
    present = [n for n in dict.fromkeys(names) if projection.has_adapter(n)]
    vectors: list[HeadVectors] = [projection.vectors(n) for n in present]
    width = projection.num_heads * projection.head_dim
    position = {name: i + 1 for i, name in enumerate(present)}  # 0: identity (base or no heads here)
    index = torch.tensor([position.get(n, 0) for n in names], dtype=torch.long, device=device)
    index = index.repeat_interleave(expand) if expand > 1 else index

    def table(kind: str, fill: float) -> torch.Tensor | None:
        dense = [getattr(v, f"dense_{kind}")() for v in vectors]
        if all(d is None for d in dense):
            return None
        identity = torch.full((width,), fill, dtype=torch.float32, device=device)
        rows = [identity] + [identity if d is None else d.to(device) for d in dense]
        return torch.stack(rows).index_select(0, index).unsqueeze(1)

    with torch.no_grad():
        offset, scale = table("offset", 0.0), table("scale", 1.0)
    return RowVectors(offset, scale)


@contextlib.contextmanager
def mixed_adapters(model: MixedModel, names: list[str], expand: int = 1) -> Iterator[None]:
    """Inside the block, every wrapped projection applies `names[i]`'s adapter to batch row i.

    Args:
        model: the `LofitModel` (in eval mode, nothing merged, adapter layers enabled).
        names: one checked adapter name per row (see `check_adapter_names`).
        expand: how many consecutive rows each name covers (`generate`'s beams / return sequences).
    """
    _check_state(model)
    layers = model.projections()
    for projection in layers:
        projection.row_vectors = _row_vectors(projection, names, expand, projection.weight.device)
    try:
        yield
    finally:
        for projection in layers:
            projection.row_vectors = None


def batch_size_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The row count of a forward/generate call's inputs (None if no tensor input is found)."""
    for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("inputs")):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return None


def generation_expand_size(model: MixedModel, kwargs: dict[str, Any]) -> int:
    """How many rows `generate` makes of each input row: max(num_beams, num_return_sequences)."""
    config = kwargs.get("generation_config") or getattr(model.model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", None) or 1)
    returns = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", None) or 1)
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
        raise MixedBatchError(
            "adapter_names does not support assisted generation; generate each adapter's rows separately"
        )
    return max(int(beams or 1), int(returns or 1))
