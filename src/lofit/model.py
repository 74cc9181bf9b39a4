"""`LofitModel`: a Hugging Face causal LM with named LoFiT adapters on its attention heads."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import HeadMap, LofitConfig, LofitConfigError
from .heads import HeadGeometry, find_output_projections
from .integrations.visibility import CAUSAL_LM_SIGNATURE, expose_forward_signature, guard_wrapped_save
from .layer import HeadVectors, LofitProjection
from .lm_head import add_contiguous_input_hook, remove_contiguous_input_hook
from .wrappers import PassThroughModel

HeadParams = dict[tuple[int, int], dict[str, torch.Tensor]]


class LofitModel(PassThroughModel):
    """A base model whose attention output projections carry LoFiT adapters.

    `forward`, `generate` and every other attribute pass through to the base model.
    """

    def __init__(self, base_model: nn.Module, config: LofitConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = base_model
        self.geometry: HeadGeometry = find_output_projections(base_model, config.target_modules)
        self.lofit_config: dict[str, LofitConfig] = {}
        self.active_adapter: str = adapter_name
        self._wrap_projections()
        add_contiguous_input_hook(base_model)
        expose_forward_signature(self, base_model)  # Trainer/TRL read the arguments from it
        guard_wrapped_save(base_model, lambda module: isinstance(module, LofitProjection))
        try:
            self.add_adapter(adapter_name, config)
        except BaseException:
            self.unload()  # a bad config must not leave the caller's model wrapped
            raise

    # ----------------------------------------------------------------------------------- plumbing
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model with the active adapter (an instance shows the wrapped model's signature)."""
        return super().forward(*args, **kwargs)

    forward.__signature__ = CAUSAL_LM_SIGNATURE  # type: ignore[attr-defined]

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """Enable activation checkpointing, with gradients able to reach the adapter.

        Non-reentrant by default: it needs no input that requires grad, so backward still stops at the
        lowest adapted layer (transformers makes the embedding output require grad; that is undone
        here). With `use_reentrant=True`, a checkpointed block whose inputs do not require grad returns
        outputs without a graph, so the embedding outputs must require grad (as PEFT does).
        `train_adapter` honours the switch even though it runs the base in eval mode, where transformers'
        own checkpointing is inert (see `lofit.layer_checkpointing`).
        """
        options = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        base = self.base_model
        enable = getattr(base, "activation_checkpointing_enable", None)
        if callable(enable):  # transformers >= 5 (gradient_checkpointing_enable is its deprecated alias)
            enable(activation_checkpointing_kwargs=options, **kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **kwargs)  # type: ignore[operator]
        if options["use_reentrant"]:
            if not getattr(base, "_require_grads_hooks", None) and hasattr(
                base, "enable_input_require_grads"
            ):
                base.enable_input_require_grads()  # type: ignore[operator]
        elif hasattr(base, "disable_input_require_grads"):
            base.disable_input_require_grads()  # type: ignore[operator]

    def _wrap_projections(self) -> None:
        for site in self.geometry.sites:
            module = self.base_model.get_submodule(site.name)
            if isinstance(module, LofitProjection):
                continue
            parent_name, _, child = site.name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name)
            setattr(parent, child, LofitProjection(module, site.layer, site.num_heads, site.head_dim))

    def projections(self) -> list[LofitProjection]:
        """The wrapped output projection of every layer, in layer order."""
        wrapped = [self.base_model.get_submodule(site.name) for site in self.geometry.sites]
        assert all(isinstance(m, LofitProjection) for m in wrapped)
        return wrapped  # type: ignore[return-value]

    # ----------------------------------------------------------------------------------- adapters
    @property
    def adapter_names(self) -> list[str]:
        return list(self.lofit_config)

    def _resolve_heads(self, heads: HeadMap | None) -> HeadMap:
        geometry = self.geometry
        if heads is None:
            return {layer: list(range(geometry.num_heads)) for layer in range(geometry.num_layers)}
        for layer, layer_heads in heads.items():
            if layer >= geometry.num_layers:
                raise LofitConfigError(
                    f"heads: layer {layer} is out of range; this model has layers 0..{geometry.num_layers - 1}"
                )
            bad = [h for h in layer_heads if h >= geometry.num_heads]
            if bad:
                raise LofitConfigError(
                    f"heads[{layer}]: head indices {bad} are out of range; this model has heads "
                    f"0..{geometry.num_heads - 1} in each layer"
                )
        if not any(heads.values()):
            raise LofitConfigError(
                "heads selects no head at all; pass at least one (layer, head) or None for all"
            )
        return heads

    def add_adapter(self, adapter_name: str, config: LofitConfig) -> None:
        """Add a new adapter (inactive unless it is the first) with freshly initialised vectors."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise LofitConfigError(
                f"adapter_name must be a non-empty string without '.', got {adapter_name!r}"
            )
        if adapter_name in self.lofit_config:
            raise LofitConfigError(
                f"an adapter named {adapter_name!r} exists already; delete_adapter() it first"
            )
        heads = self._resolve_heads(config.heads)
        for projection in self.projections():
            layer_heads = heads.get(projection.layer_index)
            if not layer_heads:
                continue
            projection.lofit_adapters[adapter_name] = HeadVectors(
                layer_heads,
                projection.num_heads,
                projection.head_dim,
                config.use_scale,
                config.use_offset,
                config.init_std,
                device=projection.weight.device,
            )
        self.lofit_config[adapter_name] = config
        if len(self.lofit_config) == 1:
            self.set_adapter(adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the adapter applied in forward passes."""
        self._check_adapter(adapter_name)
        self.active_adapter = adapter_name
        for projection in self.projections():
            projection.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_adapter(adapter_name)
        for projection in self.projections():
            if adapter_name in projection.lofit_adapters:
                del projection.lofit_adapters[adapter_name]
        del self.lofit_config[adapter_name]
        if self.active_adapter == adapter_name:
            remaining = self.adapter_names
            if remaining:
                self.set_adapter(remaining[0])
            else:
                self.active_adapter = ""
                for projection in self.projections():
                    projection.active_adapter = None

    def _check_adapter(self, adapter_name: str | None) -> str:
        name = self.active_adapter if adapter_name is None else adapter_name
        if name not in self.lofit_config:
            raise KeyError(f"no adapter named {name!r}; this model has {self.adapter_names}")
        return name

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model behaves exactly like the base model."""
        projections = self.projections()
        previous = [p.adapter_disabled for p in projections]
        for projection in projections:
            projection.adapter_disabled = True
        try:
            yield
        finally:
            for projection, flag in zip(projections, previous, strict=True):
                projection.adapter_disabled = flag

    def adapter_vectors(self, adapter_name: str | None = None) -> dict[int, HeadVectors]:
        """layer -> that layer's vectors for the adapter (layers without selected heads are absent)."""
        name = self._check_adapter(adapter_name)
        result: dict[int, HeadVectors] = {}
        for projection in self.projections():
            if name in projection.lofit_adapters:
                vectors = projection.lofit_adapters[name]
                assert isinstance(vectors, HeadVectors)
                result[projection.layer_index] = vectors
        return result

    def adapter_parameters(
        self, adapter_name: str | None = None, kind: str | None = None
    ) -> list[nn.Parameter]:
        """The adapter's parameters; `kind` "scale" or "offset" picks one sort."""
        params: list[nn.Parameter] = []
        for vectors in self.adapter_vectors(adapter_name).values():
            for name in ("scale", "offset"):
                param = getattr(vectors, name)
                if param is not None and (kind is None or kind == name):
                    params.append(param)
        return params

    def selected_heads(self, adapter_name: str | None = None) -> HeadMap:
        return {layer: v.heads.tolist() for layer, v in self.adapter_vectors(adapter_name).items()}

    def set_trainable(self, adapter_name: str | None = None) -> None:
        """Freeze everything except the given adapter's vectors."""
        for param in self.parameters():
            param.requires_grad_(False)
        for param in self.adapter_parameters(adapter_name):
            param.requires_grad_(True)

    # ----------------------------------------------------------------------------- head params
    def get_head_params(self, adapter_name: str | None = None) -> HeadParams:
        """{(layer, head): {"scale": A, "offset": v}}; a part the adapter does not learn is zeros."""
        result: HeadParams = {}
        for layer, vectors in self.adapter_vectors(adapter_name).items():
            for row, head in enumerate(vectors.heads.tolist()):
                entry = {}
                for name in ("scale", "offset"):
                    param = getattr(vectors, name)
                    entry[name] = (
                        param[row].detach().clone()
                        if param is not None
                        else torch.zeros(vectors.head_dim, device=vectors.heads.device)
                    )
                result[(layer, head)] = entry
        return result

    def set_head_params(self, params: HeadParams, adapter_name: str | None = None) -> None:
        """Inverse of `get_head_params`: copy [head_dim] tensors into the adapter's vectors."""
        vectors_by_layer = self.adapter_vectors(adapter_name)
        with torch.no_grad():
            for (layer, head), entry in params.items():
                vectors = vectors_by_layer.get(layer)
                rows = [] if vectors is None else (vectors.heads == head).nonzero().flatten().tolist()
                if vectors is None or not rows:
                    raise KeyError(f"head ({layer}, {head}) is not part of this adapter")
                for name, value in entry.items():
                    if name not in ("scale", "offset"):
                        raise KeyError(f"unknown head parameter {name!r}; expected 'scale' or 'offset'")
                    param = getattr(vectors, name)
                    value = torch.as_tensor(value)
                    if value.shape != (vectors.head_dim,):
                        raise ValueError(
                            f"head ({layer}, {head}) {name}: expected shape ({vectors.head_dim},), got "
                            f"{tuple(value.shape)}"
                        )
                    if param is None:
                        if torch.any(value != 0):
                            raise ValueError(
                                f"this adapter does not learn a {name}; cannot set a non-zero one"
                            )
                        continue
                    param[rows[0]].copy_(value.to(param))

    def print_trainable_parameters(self) -> None:
        trainable, total = self.count_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def count_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    # ------------------------------------------------------------------------- save / load / merge
    def save_pretrained(self, path: str | os.PathLike[str], adapter_name: str | None = None) -> None:
        """Write `lofit_config.json` and `lofit_model.safetensors` (atomically) into `path`."""
        from .persistence import save_adapter

        save_adapter(self, path, self._check_adapter(adapter_name))

    def load_adapter(
        self,
        path: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
    ) -> None:
        """Load a saved adapter (a folder or a Hub repo id, see `lofit.hub`) under `adapter_name`; it becomes active."""
        from .hub import resolve_adapter_dir
        from .persistence import load_adapter_into

        load_adapter_into(self, resolve_adapter_dir(path, revision, token), adapter_name, is_trainable)

    @classmethod
    def from_pretrained(
        cls,
        base_model: nn.Module,
        path: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
    ) -> LofitModel:
        """Wrap `base_model` with the adapter saved at `path`: a local folder, or a Hub repo id ("org/name").

        A local path wins; a repo id is fetched through huggingface_hub (its cache, HF_HUB_OFFLINE, tokens)
        at `revision`, just the adapter files (see `lofit.hub.resolve_adapter_dir`).
        """
        from .hub import resolve_adapter_dir
        from .persistence import load_lofit_model

        folder = resolve_adapter_dir(path, revision, token)
        return load_lofit_model(base_model, folder, adapter_name, is_trainable)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the adapter and a generated model card to the Hub repo `repo_id` (created if missing).

        Keyword arguments: `adapter_name`, `commit_message`, `private`, `token`, `revision`, `create_pr`,
        `metrics` (shown in the card); see `lofit.hub.push_adapter`. Returns the commit info.
        """
        from .hub import push_adapter

        return push_adapter(self, repo_id, **kwargs)

    def merge_and_unload(self, adapter_name: str | None = None) -> nn.Module:
        """Fold the adapter into the projections' weights and bias; return the plain base model.

        Only the adapted output projections gain a bias (see `lofit.merge.exportable_biases` for the
        export), and the LM head keeps the pre-hook of `lofit.lm_head` (fast frozen-weight generation).
        """
        from .merge import merge_into_base

        return merge_into_base(self, self._check_adapter(adapter_name))

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; return the plain base model."""
        from .merge import unwrap_projections

        remove_contiguous_input_hook(self.base_model)
        return unwrap_projections(self)


def get_lofit_model(base_model: nn.Module, config: LofitConfig, adapter_name: str = "default") -> LofitModel:
    """Wrap `base_model` with a trainable LoFiT adapter; base weights are frozen.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    >>> model = get_lofit_model(base, LofitConfig(heads={1: [0, 2]}))
    >>> model.count_parameters()[0]   # 2 heads x head_dim 8
    16
    """
    model = LofitModel(base_model, config, adapter_name)
    model.set_trainable(adapter_name)
    return model
