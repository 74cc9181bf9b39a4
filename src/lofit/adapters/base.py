"""The machinery shared by LoFiT and RED: wrapped sites, named adapters, disabling, merging, counting.

An adapter method is three small parts on this base, as in PEFT's tuners:

- a config (a dataclass with `to_dict` / `from_dict`),
- a layer (`AdapterLayer` subclass) that wraps one projection, holds the vectors of each named adapter,
  and folds them into the projection (`merge`) and back out (`unmerge`),
- a model (`AdapterModel` subclass) that finds the sites, wraps them and offers PEFT's names:
  `get_base_model()`, `active_adapter(s)`, `set_adapter`, `delete_adapter`, `disable_adapter()`,
  `enable/disable_adapter_layers()`, `merge_and_unload()`, `unload()`, the parameter counts.

`AdapterModel.model` is the wrapped transformers model. Its `base_model` is, as on every transformers
model, the decoder stack (`LlamaForCausalLM.base_model` is the `LlamaModel`): code that treats the
wrapper like the causal LM it wraps (TRL does) keeps working. `get_base_model()` is the causal LM.

Example:
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from lofit import LofitConfig, get_lofit_model
    >>> model = get_lofit_model(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2)), LofitConfig())
    >>> isinstance(model, AdapterModel), type(model.base_model).__name__, model.site_names[0]
    (True, 'GPT2Model', 'transformer.h.0.attn.c_proj')
    >>> model.disable_adapter_layers(); model.adapter_layers()[0].applies_adapter()
    False
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import LofitRuntimeError, LofitValueError
from .folding import innermost
from .heads import module_tensor
from .lm_head import add_contiguous_input_hook, remove_contiguous_input_hook
from .wrappers import PassThroughModel


class AdapterNameError(LofitValueError, KeyError):
    """No adapter of that name exists, or the name is not usable; the message lists the names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterLayer(nn.Module):
    """A wrapper of one projection (`base_layer`) that applies the active adapter.

    Subclasses hold their vectors and implement `_fold(adapter_name)`, which folds that adapter into
    `base_layer` in place. `merge()` keeps the original weight and bias so that `unmerge()` restores
    them exactly (bit for bit); `merge_and_unload` folds without keeping them.
    """

    def __init__(self, base_layer: nn.Module, layer_index: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.active_adapter: str | None = None
        self.adapter_disabled = False
        self.merged_adapters: list[str] = []
        self._originals: dict[str, torch.Tensor | None] = {}

    @property
    def weight(self) -> torch.Tensor:
        return module_tensor(self.base_layer, "weight")

    @property
    def bias(self) -> torch.Tensor | None:
        return (
            None if getattr(self.base_layer, "bias", None) is None else module_tensor(self.base_layer, "bias")
        )

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def get_base_layer(self) -> nn.Module:
        """The projection this layer wraps (under any further wrappers)."""
        return innermost(self)

    def has_adapter(self, adapter_name: str) -> bool:
        raise NotImplementedError

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        raise NotImplementedError

    def _fold(self, adapter_name: str) -> None:
        raise NotImplementedError

    def applies_adapter(self) -> bool:
        """Whether forward applies the active adapter's vectors now (not disabled, not merged)."""
        return (
            not self.adapter_disabled
            and not self.merged
            and self.active_adapter is not None
            and self.has_adapter(self.active_adapter)
        )

    def merge(self, adapter_name: str | None = None) -> None:
        """Fold the adapter (default: the active one) into the projection's weight and bias.

        Forward then runs the plain projection. The original weight and bias are kept for `unmerge`.

        Args:
            adapter_name: the adapter to fold; None folds the active adapter.
        """
        name = adapter_name or self.active_adapter
        if self.merged or name is None or not self.has_adapter(name):
            return
        inner = self.get_base_layer()
        bias = getattr(inner, "bias", None)
        self._originals = {
            "weight": module_tensor(inner, "weight").detach().clone(),
            "bias": None if bias is None else bias.detach().clone(),
        }
        self._fold(name)
        self.merged_adapters = [name]

    def unmerge(self) -> None:
        """Undo `merge`: restore the original weight and bias exactly (bit for bit)."""
        if not self.merged:
            return
        inner = self.get_base_layer()
        with torch.no_grad():
            original_weight = self._originals["weight"]
            assert original_weight is not None
            module_tensor(inner, "weight").copy_(original_weight)
            original_bias = self._originals["bias"]
            if original_bias is None:
                inner.bias = None  # type: ignore[assignment]
            else:
                module_tensor(inner, "bias").copy_(original_bias)
        self._originals = {}
        self.merged_adapters = []


class AdapterModel(PassThroughModel):
    """A transformers model whose sites (one projection per decoder layer) carry `AdapterLayer`s.

    Subclasses set `self.model`, call `_wrap_sites`, and keep `self.adapter_configs` (name -> config).
    `forward`, `generate` and every attribute the wrapper lacks pass through to `self.model`.
    """

    layer_class: type[AdapterLayer] = AdapterLayer

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.site_names: list[str] = []
        self.adapter_configs: dict[str, Any] = {}
        self._active_adapter: str = ""
        # "unload()" or "merge_and_unload()" once the sites are unwrapped
        self._unloaded_by: str | None = None

    # ----------------------------------------------------------------------------------- sites
    @property
    def base_model(self) -> nn.Module:
        """The decoder stack, as `base_model` of the wrapped transformers model (see the module doc)."""
        inner = getattr(self.model, "base_model", None)
        return inner if isinstance(inner, nn.Module) else self.model

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (PEFT's name), with its adapted layers still wrapped."""
        return self.model

    def _wrap_sites(self, sites: list[tuple[int, str]], make_layer: Any) -> None:
        """Replace each (layer, name) module by `make_layer(module, layer)`; undone on error."""
        for layer, name in sites:
            module = self.model.get_submodule(name)
            if isinstance(module, self.layer_class):
                raise LofitValueError(
                    f"{name} already carries a {type(module).__name__}; use the model that wrapped it"
                )
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, make_layer(module, layer))
            self.site_names.append(name)
        add_contiguous_input_hook(self.model)

    def adapter_layers(self) -> list[AdapterLayer]:
        """The wrapped projection of every layer, in layer order."""
        if self._unloaded_by is not None:
            raise LofitRuntimeError(
                f"this {type(self).__name__} was unwrapped by {self._unloaded_by} and holds no adapter "
                "layers any more; use the model that call returned, or wrap a base model again "
                "(get_lofit_model / from_pretrained)"
            )
        wrapped = [self.model.get_submodule(name) for name in self.site_names]
        assert all(isinstance(m, self.layer_class) for m in wrapped)
        return wrapped  # type: ignore[return-value]

    def _unwrap(self, by: str = "unload()") -> nn.Module:
        for name in self.site_names:
            wrapper = self.model.get_submodule(name)
            if isinstance(wrapper, self.layer_class):
                parent_name, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name), child, wrapper.base_layer)
        remove_contiguous_input_hook(self.model)
        self._unloaded_by = by
        return self.model

    # ----------------------------------------------------------------------------------- names
    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_configs)

    @property
    def active_adapter(self) -> str:
        """The name of the adapter applied in forward passes ("" when none is left)."""
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        """PEFT's list form of `active_adapter`."""
        return [self._active_adapter] if self._active_adapter else []

    def _check_adapter(self, adapter_name: str | None) -> str:
        name = self._active_adapter if adapter_name is None else adapter_name
        if name not in self.adapter_configs:
            raise AdapterNameError(f"no adapter named {name!r}; this model has {self.adapter_names}")
        return name

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the adapter applied in forward passes."""
        self._check_adapter(adapter_name)
        self._active_adapter = adapter_name
        for layer in self.adapter_layers():
            layer.active_adapter = adapter_name

    def _forget_adapter(self, adapter_name: str) -> None:
        del self.adapter_configs[adapter_name]
        if self._active_adapter == adapter_name:
            remaining = self.adapter_names
            if remaining:
                self.set_adapter(remaining[0])
            else:
                self._active_adapter = ""
                for layer in self.adapter_layers():
                    layer.active_adapter = None

    # --------------------------------------------------------------------------------- switches
    def enable_adapter_layers(self) -> None:
        """Apply the active adapter again after `disable_adapter_layers()`."""
        for layer in self.adapter_layers():
            layer.adapter_disabled = False

    def disable_adapter_layers(self) -> None:
        """Run the base model (every adapter switched off) until `enable_adapter_layers()`."""
        for layer in self.adapter_layers():
            layer.adapter_disabled = True

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model behaves exactly like the base model."""
        layers = self.adapter_layers()
        previous = [layer.adapter_disabled for layer in layers]
        for layer in layers:
            layer.adapter_disabled = True
        try:
            yield
        finally:
            for layer, flag in zip(layers, previous, strict=True):
                layer.adapter_disabled = flag

    # ------------------------------------------------------------------------------ parameters
    def adapter_parameters(self, adapter_name: str | None = None) -> list[nn.Parameter]:
        """The adapter's own parameters (default: the active adapter's), in layer order."""
        name = self._check_adapter(adapter_name)
        return [p for layer in self.adapter_layers() for p in layer.adapter_parameters(name)]

    def set_trainable(self, adapter_name: str | None = None) -> None:
        """Freeze everything except the given adapter's parameters (default: the active adapter)."""
        for param in self.parameters():
            param.requires_grad_(False)
        for param in self.adapter_parameters(adapter_name):
            param.requires_grad_(True)

    def count_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, each tensor counted once."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """PEFT's name for `count_parameters`."""
        return self.count_parameters()

    def print_trainable_parameters(self) -> None:
        """Print "trainable params: N || all params: M || trainable%: P" (PEFT's format)."""
        trainable, total = self.count_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ---------------------------------------------------------------------------- merge / unload
    def merge_adapter(self, adapter_name: str | None = None) -> None:
        """Fold the adapter into every wrapped projection, keeping the wrappers (see `unmerge_adapter`)."""
        name = self._check_adapter(adapter_name)
        for layer in self.adapter_layers():
            layer.merge(name)

    def unmerge_adapter(self) -> None:
        """Undo `merge_adapter`, restoring the original weights exactly."""
        for layer in self.adapter_layers():
            layer.unmerge()

    def _fold_and_unwrap(self, adapter_name: str) -> nn.Module:
        for layer in self.adapter_layers():
            if layer.merged:
                layer.unmerge()
            if layer.has_adapter(adapter_name):
                layer._fold(adapter_name)
        return self._unwrap("merge_and_unload()")

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; return the plain base model."""
        self.unmerge_adapter()
        return self._unwrap()
