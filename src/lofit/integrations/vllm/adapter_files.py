"""Read a saved LoFiT adapter into the dense per-layer vectors that `AdapterTables` serves.

The adapter is read and validated by `lofit.adapters.persistence` (the files `LofitModel.save_pretrained`
writes, or a Hub id via `lofit.adapters.hub`), then checked against the served model: its model type,
sizes and the fingerprint of every attention output projection must match (an adapter is never silently
applied to other weights): the projection's digest in the adapter's whole-model fingerprint
(`lofit.adapters.fingerprint_store`), or, in adapters of format 1, its `projection_fingerprint`. Adapters with scales (A) are served exactly, like offsets.

Example:
    >>> import tempfile, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from lofit import LofitConfig, get_lofit_model
    >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     get_lofit_model(base, LofitConfig(heads={1: [2]}, init_std=0.1)).save_pretrained(tmp)
    ...     served = ServedModel.from_hf_config(base.config)
    ...     vectors = read_dense_vectors(tmp, served)
    >>> sorted(vectors), vectors[1].offset.shape, vectors[1].scale
    ([1], torch.Size([32]), None)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...adapters.fingerprint import (
    DTYPE_RTOL,
    FINGERPRINT_RTOL,
    digest_difference,
    projection_fingerprint,
    tensor_digest,
)
from ...adapters.hub import resolve_adapter_dir
from ...adapters.persistence import read_adapter_config, read_adapter_tensors
from ...errors import BaseModelMismatchError
from .tables import DenseVectors

SERVED_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3")
"""Model types whose vLLM implementation the plugin wraps (attention output projection `self_attn.o_proj`)."""
PROJECTION_NAME = "model.layers.{layer}.self_attn.o_proj.weight"  # in these models' Hugging Face checkpoints


@dataclass(frozen=True)
class ServedModel:
    """What an adapter is checked against: the served model's type, sizes and projection weights.

    Args:
        model_type: the Hugging Face `model_type`.
        num_layers: decoder layers.
        num_heads: attention heads.
        head_dim: width of one head.
        hidden_size: the residual width.
        vocab_size: the vocabulary size.
        projection_weight: layer -> its attention output projection weight [hidden, heads * head_dim]
            (None: not available, e.g. sharded by tensor parallelism; the fingerprint check is skipped).
    """

    model_type: str
    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    projection_weight: Callable[[int], torch.Tensor | None] | None = None
    _fingerprints: dict[int, list[float] | None] = field(default_factory=dict, compare=False, repr=False)
    _digests: dict[int, dict[str, Any] | None] = field(default_factory=dict, compare=False, repr=False)

    def projection_digest(self, layer: int) -> dict[str, Any] | None:
        """The `tensor_digest` of `layer`'s output projection weight (computed once; None: not available)."""
        if self.projection_weight is None:
            return None
        if layer not in self._digests:
            weight = self.projection_weight(layer)
            self._digests[layer] = None if weight is None else tensor_digest(weight)
        return self._digests[layer]

    def projection_fingerprint(self, layer: int) -> list[float] | None:
        """The fingerprint of `layer`'s output projection weight (computed once; None: not available)."""
        if self.projection_weight is None:
            return None
        if layer not in self._fingerprints:
            weight = self.projection_weight(layer)
            self._fingerprints[layer] = None if weight is None else projection_fingerprint(weight)
        return self._fingerprints[layer]

    @classmethod
    def from_hf_config(
        cls, config: Any, projection_weight: Callable[[int], torch.Tensor | None] | None = None
    ) -> ServedModel:
        """Read the sizes from a transformers config (as vLLM's `hf_config`)."""
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            model_type=str(config.model_type),
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            head_dim=int(head_dim),
            hidden_size=int(config.hidden_size),
            vocab_size=int(config.vocab_size),
            projection_weight=projection_weight,
        )


def read_dense_vectors(
    name_or_path: str | os.PathLike[str], served: ServedModel, revision: str | None = None
) -> dict[int, DenseVectors]:
    """The adapter's dense vectors per edited layer, after checking it fits `served`.

    Args:
        name_or_path: a folder written by `LofitModel.save_pretrained`, or a Hub repo id.
        served: the served model (see `ServedModel`).
        revision: the Hub revision (ignored for a folder).

    Returns:
        layer -> `DenseVectors` ([num_heads * head_dim] fp32 offset and/or 1 + A).

    Raises:
        BaseModelMismatchError: the adapter was saved for another model.
        AdapterLoadError / FileNotFoundError: the files are missing or invalid.
    """
    path = resolve_adapter_dir(name_or_path, revision)
    config, identity = read_adapter_config(path)
    _check_base(identity, served, Path(path))
    tensors = read_adapter_tensors(path, config, served.head_dim)
    assert config.heads is not None
    layers: dict[int, DenseVectors] = {}
    for layer, heads in config.heads.items():
        if not heads:
            continue
        index = torch.tensor(heads, dtype=torch.long)
        offset = scale = None
        if config.use_offset:
            offset = _dense(tensors[f"layers.{layer}.offset"], index, served, fill=0.0)
        if config.use_scale:
            scale = _dense(1.0 + tensors[f"layers.{layer}.scale"].float(), index, served, fill=1.0)
        layers[int(layer)] = DenseVectors(offset=offset, scale=scale)
    return layers


def _dense(values: torch.Tensor, heads: torch.Tensor, served: ServedModel, fill: float) -> torch.Tensor:
    dense = torch.full((served.num_heads, served.head_dim), fill, dtype=torch.float32)
    return dense.index_copy(0, heads, values.float()).flatten()


def _check_base(identity: dict[str, Any], served: ServedModel, source: Path) -> None:
    """Refuse an adapter saved for another model: type, sizes, adapted projections' fingerprints."""
    if served.model_type not in SERVED_MODEL_TYPES:
        raise BaseModelMismatchError(
            f"the served model is a {served.model_type!r}; the lofit vLLM plugin serves {list(SERVED_MODEL_TYPES)}"
        )
    fields = ("model_type", "num_layers", "num_heads", "head_dim", "hidden_size", "vocab_size")
    for name in fields:
        saved, current = identity.get(name), getattr(served, name)
        if saved is not None and saved != current:
            raise BaseModelMismatchError(
                f"{source}: the adapter was saved for a base with {name}={saved!r}, but the served "
                f"model has {name}={current!r}; serve the base model it was trained on"
            )
    if served.projection_weight is None:
        return
    fingerprints = identity.get("projection_fingerprint")
    if not isinstance(
        fingerprints, list
    ):  # format 2: the projections' digests in the whole-model fingerprint
        _check_projection_digests(identity, served, source)
        return
    for layer, saved_print in enumerate(fingerprints):
        current_print = None if saved_print is None else served.projection_fingerprint(layer)
        if current_print is not None and not _close(saved_print, current_print):
            raise BaseModelMismatchError(
                f"{source}: the attention output projection of layer {layer} differs from the one the "
                "adapter was trained on; serve the base model it was saved for"
            )


def _check_projection_digests(identity: dict[str, Any], served: ServedModel, source: Path) -> None:
    saved = (identity.get("weights_fingerprint") or {}).get("tensors") or {}
    for layer in range(served.num_layers):
        digest = saved.get(PROJECTION_NAME.format(layer=layer))
        current = None if digest is None else served.projection_digest(layer)
        difference = "" if current is None else digest_difference(digest, current)
        if difference:
            raise BaseModelMismatchError(
                f"{source}: the attention output projection of layer {layer} differs from the one the adapter "
                f"was trained on ({difference}); serve the base model it was saved for"
            )


def _close(saved: list[float], current: list[float]) -> bool:
    """Fingerprints equal up to dtype rounding (the slack `lofit.adapters.fingerprint` allows)."""
    spread = FINGERPRINT_RTOL * max(abs(saved[0]), 1e-12)
    return len(saved) == len(current) and all(
        abs(a - b) <= spread + DTYPE_RTOL * abs(a) for a, b in zip(saved, current, strict=True)
    )


def checkpoint_projections(
    model: str | os.PathLike[str], revision: str | None = None
) -> Callable[[int], torch.Tensor | None] | None:
    """Layer -> the attention output projection weight stored in a model's safetensors checkpoint.

    The served engine may repack its weights (vLLM's CPU backend does), so adapters are checked against
    the checkpoint it loaded instead. `model` is a folder or a Hub id already in the local cache (vLLM
    downloads it there); None when no safetensors checkpoint is found (the check is then skipped).
    """
    from safetensors import safe_open

    folder = Path(model)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    os.fspath(model),
                    revision=revision,
                    local_files_only=True,
                    allow_patterns=["*.safetensors"],
                )
            )
        except Exception:  # not cached: nothing to compare with
            return None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))

    def projection_weight(layer: int) -> torch.Tensor | None:
        key = f"model.layers.{layer}.self_attn.o_proj.weight"
        if key not in where:
            return None
        with safe_open(str(where[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    return projection_weight
