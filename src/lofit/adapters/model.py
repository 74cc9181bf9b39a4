"""`LofitModel`: a Hugging Face causal LM with named LoFiT adapters on its attention heads."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterLoadError, LofitRuntimeError, LofitValueError
from .base import AdapterModel
from .config import HeadMap, LofitConfig, LofitConfigError
from .fingerprint import base_model_identity, check_same_base
from .fingerprint_store import unpack_identity
from .folding import innermost
from .heads import HeadGeometry, find_output_projections
from .layer import HeadVectors, LofitProjection, vectors_held_fixed
from .lm_head import add_contiguous_input_hook
from .merged import complete_merged_model, plan_merged_model
from .mixed_batch import BASE_NAME, batch_size_of, check_adapter_names, generation_expand_size, mixed_adapters
from .persistence import (
    CONFIG_NAME,
    adapter_document,
    adapter_state,
    adapter_tensors,
    check_adapter_tensors,
    parse_adapter_document,
    read_adapter_config,
    read_adapter_tensors,
    save_adapter,
    state_document,
    state_file,
)
from .visibility import CAUSAL_LM_SIGNATURE, expose_forward_signature, guard_wrapped_save

HeadParams = dict[tuple[int, int], dict[str, torch.Tensor]]


def _is_peft_model(model: nn.Module) -> bool:
    """Whether `model` carries PEFT adapters (a PeftModel or injected tuner layers)."""
    return any(type(m).__module__.split(".", 1)[0] == "peft" for m in model.modules())


class LofitModel(AdapterModel):
    """A base model whose attention output projections carry LoFiT adapters.

    `forward`, `generate` and every other attribute pass through to the wrapped model, so the wrapper
    is used like the causal LM itself. PEFT's names work: `get_base_model()` is the wrapped causal LM,
    `base_model` its decoder stack (as for any transformers causal LM), `active_adapter(s)`,
    `set_adapter`, `add_adapter`, `delete_adapter`, `disable_adapter()`, `enable_adapter_layers()` /
    `disable_adapter_layers()`, `merge_adapter()` / `unmerge_adapter()`, `merge_and_unload()`, `unload()`.
    `lofit_config` maps each adapter name to its `LofitConfig` (PEFT's `peft_config`; lofit does not use
    that name, because PEFT takes a model with a `peft_config` attribute for one of its own).

    Args:
        base_model: a transformers causal LM (or a PEFT model wrapping one).
        config: the first adapter's configuration.
        adapter_name: its name.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        >>> model = LofitModel(base, LofitConfig(heads={0: [1]}))
        >>> model.add_adapter("other", LofitConfig(heads={1: [0, 3]}))
        >>> model.active_adapters, model.adapter_names
        (['default'], ['default', 'other'])
        >>> [p.requires_grad for p in model.adapter_parameters("default") + model.adapter_parameters("other")]
        [False, True]
        >>> model.get_base_model() is base, type(model.base_model).__name__
        (True, 'LlamaModel')
    """

    layer_class = LofitProjection

    def __init__(self, base_model: nn.Module, config: LofitConfig, adapter_name: str = "default") -> None:
        check_base_model(base_model, type(self).__name__)
        if not isinstance(config, LofitConfig):
            raise LofitConfigError(
                f"config must be a LofitConfig, got {type(config).__name__}"
                + ("; build it with LofitConfig(**your_dict)" if isinstance(config, dict) else "")
            )
        super().__init__(base_model)
        self.geometry: HeadGeometry = find_output_projections(base_model, config.target_modules)
        self._wrap_sites(
            [(site.layer, site.name) for site in self.geometry.sites],
            lambda module, layer: LofitProjection(
                module, layer, self.geometry.num_heads, self.geometry.head_dim
            ),
        )
        expose_forward_signature(self, base_model)  # Trainer/TRL read the arguments from it
        guard_wrapped_save(base_model, lambda module: isinstance(module, LofitProjection))
        try:
            self.add_adapter(adapter_name, config)
        except BaseException:
            self.unload()  # a bad config must not leave the caller's model wrapped
            raise

    @property
    def lofit_config(self) -> dict[str, LofitConfig]:
        """adapter name -> its `LofitConfig` (PEFT's `peft_config` mapping)."""
        return self.adapter_configs

    # ----------------------------------------------------------------------------------- plumbing
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """Run the wrapped model with the active adapter (an instance shows the wrapped model's signature).

        Args:
            *args, **kwargs: the wrapped model's arguments (`input_ids`, `attention_mask`, `labels`, ...).
            adapter_names: inference only: one adapter name per batch row (`"__base__"`: no adapter),
                applied instead of the active adapter (see `lofit.adapters.mixed_batch`).
        """
        if adapter_names is None:
            return super().forward(*args, **kwargs)
        names = check_adapter_names(self, adapter_names, batch_size_of(args, kwargs))
        with mixed_adapters(self, names):
            return super().forward(*args, **kwargs)

    forward.__signature__ = CAUSAL_LM_SIGNATURE  # type: ignore[attr-defined]

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's `generate`; `adapter_names` gives each input row its own adapter.

        Every decoding step of row i (KV cache or not) uses `adapter_names[i]`; rows that `generate`
        expands (beams, `num_return_sequences`) keep their input row's adapter. Assisted generation is
        refused with `adapter_names`.
        """
        if adapter_names is None:
            with vectors_held_fixed(self):  # one build of the dense vectors for all decoding steps
                return super().generate(*args, **kwargs)
        names = check_adapter_names(self, adapter_names, batch_size_of(args, kwargs))
        with mixed_adapters(self, names, generation_expand_size(self, kwargs)):
            return super().generate(*args, **kwargs)

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
        base = self.model
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

    def projections(self) -> list[LofitProjection]:
        """The wrapped output projection of every layer, in layer order."""
        return self.adapter_layers()  # type: ignore[return-value]

    # ----------------------------------------------------------------------------------- adapters
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
        """Add a new adapter with freshly initialised vectors; it alone of the adapters is trainable.

        As in PEFT, the other adapters' vectors are frozen (the base model's flags are left alone) and
        the active adapter stays the active one (the first adapter becomes active).

        Args:
            adapter_name: a new, non-empty name without ".".
            config: the adapter's configuration (its `target_modules` must match the model's).
        """
        self._add_vectors(adapter_name, config)
        for name in self.adapter_names:
            for param in self.adapter_parameters(name):
                param.requires_grad_(name == adapter_name)

    def _add_vectors(self, adapter_name: str, config: LofitConfig) -> None:
        check_adapter_name(adapter_name)
        if not isinstance(config, LofitConfig):
            raise LofitConfigError(f"config must be a LofitConfig, got {type(config).__name__}")
        if adapter_name == BASE_NAME:
            raise LofitConfigError(
                f"{BASE_NAME!r} is reserved (it means 'no adapter' in adapter_names=); choose another name"
            )
        if adapter_name in self.adapter_configs:
            raise LofitConfigError(
                f"an adapter named {adapter_name!r} exists already; delete_adapter() it first"
            )
        heads = self._resolve_heads(config.heads)
        for projection in self.projections():
            layer_heads = heads.get(projection.layer_index)
            if layer_heads:
                projection.lofit_adapters[adapter_name] = HeadVectors(
                    layer_heads,
                    projection.num_heads,
                    projection.head_dim,
                    config.use_scale,
                    config.use_offset,
                    config.init_std,
                    device=projection.weight.device,
                )
        self.adapter_configs[adapter_name] = config
        if len(self.adapter_configs) == 1:
            self.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the first remaining one becomes active."""
        self._check_adapter(adapter_name)
        for projection in self.projections():
            if adapter_name in projection.lofit_adapters:
                if projection.merged_adapters == [adapter_name]:
                    projection.unmerge()
                del projection.lofit_adapters[adapter_name]
        self._forget_adapter(adapter_name)

    def adapter_vectors(self, adapter_name: str | None = None) -> dict[int, HeadVectors]:
        """layer -> that layer's vectors for the adapter (layers without selected heads are absent)."""
        name = self._check_adapter(adapter_name)
        return {p.layer_index: p.vectors(name) for p in self.projections() if p.has_adapter(name)}

    def adapter_parameters(
        self, adapter_name: str | None = None, kind: str | None = None
    ) -> list[nn.Parameter]:
        """The adapter's parameters (default: the active adapter's); `kind` "scale" or "offset" picks one sort."""
        params: list[nn.Parameter] = []
        for vectors in self.adapter_vectors(adapter_name).values():
            for name in ("scale", "offset"):
                param = getattr(vectors, name)
                if param is not None and (kind is None or kind == name):
                    params.append(param)
        return params

    def selected_heads(self, adapter_name: str | None = None) -> HeadMap:
        """layer -> the head indices the adapter edits."""
        return {layer: v.heads.tolist() for layer, v in self.adapter_vectors(adapter_name).items()}

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
                    raise HeadParamsError(f"head ({layer}, {head}) is not part of this adapter")
                for name, value in entry.items():
                    if name not in ("scale", "offset"):
                        raise HeadParamsError(
                            f"unknown head parameter {name!r}; expected 'scale' or 'offset'"
                        )
                    param = getattr(vectors, name)
                    value = torch.as_tensor(value)
                    if value.shape != (vectors.head_dim,):
                        raise LofitValueError(
                            f"head ({layer}, {head}) {name}: expected shape ({vectors.head_dim},), got "
                            f"{tuple(value.shape)}"
                        )
                    if value.is_floating_point() and not torch.isfinite(value).all():
                        raise LofitValueError(
                            f"head ({layer}, {head}) {name}: holds NaN or inf; give finite values"
                        )
                    if param is None:
                        if torch.any(value != 0):
                            raise LofitValueError(
                                f"this adapter does not learn a {name}; cannot set a non-zero one"
                            )
                        continue
                    param[rows[0]].copy_(value.to(param))

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; return the plain base model (weights untouched)."""
        return super().unload()

    # ------------------------------------------------------------------------- save / load / merge
    def save_pretrained(
        self,
        path: str | os.PathLike[str],
        adapter_name: str | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write `lofit_config.json` and `lofit_model.safetensors` (atomically) into `path`.

        Args:
            path: the adapter directory (created if needed; files in it are replaced atomically).
            adapter_name: the adapter to save; None saves the active one.
            state_dict: what `state_dict()` returned (callers of transformers' `save_pretrained` pass it;
                lofit saves the adapter's own vectors, which it holds).
            **kwargs: accepted for compatibility with callers of transformers' `save_pretrained`
                (e.g. `safe_serialization`, `is_main_process`); they do not change what is written.
        """
        name = self._check_adapter(adapter_name)
        save_adapter(path, self.adapter_configs[name], self._adapter_tensors(name), self._base_identity())

    def _adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of adapter `name` as the adapter file stores them (fp32, on the CPU)."""
        tensors: dict[str, torch.Tensor] = {}
        for layer, vectors in self.adapter_vectors(name).items():
            tensors[f"layers.{layer}.heads"] = vectors.heads.detach().cpu().contiguous()
            for kind in ("scale", "offset"):
                param = getattr(vectors, kind)
                if param is not None:
                    tensors[f"layers.{layer}.{kind}"] = param.detach().float().cpu().contiguous()
        return tensors

    # ---------------------------------------------------------------------- state dict (Trainer's)
    def state_dict(  # type: ignore[override]
        self, *args: Any, destination: dict[str, Any] | None = None, prefix: str = "", keep_vars: bool = False
    ) -> dict[str, Any]:
        """The active adapter, not the base model's weights: its vectors and its config (base identity included).

        transformers' Trainer saves what `state_dict()` returns for a model that is not a `PreTrainedModel`
        (`model.safetensors` in `save_model()` and in every checkpoint) and loads it back with
        `load_state_dict` on `resume_from_checkpoint` / `load_best_model_at_end`; so a plain Trainer writes
        a few-KB file that `LofitModel.from_pretrained(base, folder)` loads. The base model's own weights
        are `model.get_base_model().state_dict()`.

        Args:
            destination, prefix: as `torch.nn.Module.state_dict` (keys are prefixed).
            keep_vars: ignored; the tensors are detached fp32 copies on the CPU.
        """
        name = self._check_adapter(None)
        tensors = self._adapter_tensors(name)
        document, fingerprint = adapter_document(self.adapter_configs[name], tensors, self._base_identity())
        out = destination if destination is not None else {}
        for key, value in adapter_state(document, {**tensors, **fingerprint}).items():
            out[prefix + key] = value
        return out

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Copy an adapter state (what `state_dict()` returned) into the active adapter, in place.

        The state must come from the same base model (checked as `from_pretrained` checks) and cover the
        same heads and vectors as the active adapter; trainable flags stay as they are (the optimizer keeps
        its parameters). `strict` and `assign` are accepted for torch's signature: the copy is always
        exact and complete.

        Raises:
            AdapterLoadError: the state is not a LoFiT adapter state, or covers other heads or vectors.
            BaseModelMismatchError: it was saved from another base model.
        """
        from torch.nn.modules.module import _IncompatibleKeys

        source = "the state dict given to LofitModel.load_state_dict"
        state = {key: value for key, value in state_dict.items() if isinstance(value, torch.Tensor)}
        document = state_document(state, source)
        config, stored = parse_adapter_document(document, Path(source))
        name = self._check_adapter(None)
        check_same_base(unpack_identity(stored, state, source), self._base_identity(), Path(source))
        current = self.adapter_configs[name]
        if config.heads != self.selected_heads(name) or (config.use_scale, config.use_offset) != (
            current.use_scale,
            current.use_offset,
        ):
            raise AdapterLoadError(
                f"{source}: it holds an adapter of heads {config.heads} (scale {config.use_scale}, offset "
                f"{config.use_offset}), the active adapter {name!r} has heads {self.selected_heads(name)} (scale "
                f"{current.use_scale}, offset {current.use_offset}); load it with LofitModel.from_pretrained"
            )
        tensors = adapter_tensors(state, Path(source))
        check_adapter_tensors(
            tensors, config, self.geometry.head_dim, Path(source), compute_dtype(self.model)
        )
        flags = [param.requires_grad for param in self.adapter_parameters(name)]
        _copy_tensors(self, name, tensors, trainable=False)
        for param, flag in zip(self.adapter_parameters(name), flags, strict=True):
            param.requires_grad_(flag)
        return _IncompatibleKeys([], [])

    def _base_identity(self) -> dict[str, Any]:
        """The base model's identity, of the unmerged weights even while an adapter is merged."""
        merged = [p for p in self.projections() if p.merged]
        for projection in merged:
            projection.unmerge()
        try:
            return lofit_identity(self.model, self.geometry)
        finally:
            for projection in merged:
                projection.merge()

    def _read_checked(
        self, path: str | os.PathLike[str], geometry: HeadGeometry | None
    ) -> tuple[LofitConfig, dict[str, torch.Tensor]]:
        return read_checked_adapter(self.model, path, geometry)

    def load_adapter(
        self,
        path: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        **kwargs: Any,
    ) -> None:
        """Load a saved adapter (a folder or a Hub repo id, see `lofit.adapters.hub`) under `adapter_name`; it becomes active.

        The other adapters keep their trainable flags; the loaded one trains only if `is_trainable`.
        """
        from .hub import resolve_adapter_dir

        check_adapter_name(adapter_name)
        check_adapter_path(path)
        config, tensors = self._read_checked(resolve_adapter_dir(path, revision, token), self.geometry)
        self._add_vectors(adapter_name, config)
        _copy_tensors(self, adapter_name, tensors, is_trainable)
        self.set_adapter(adapter_name)

    @classmethod
    def from_pretrained(
        cls,
        base_model: nn.Module,
        path: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        **kwargs: Any,
    ) -> LofitModel:
        """Wrap `base_model` and load the adapter saved at `path` (checked against the base first).

        Args:
            base_model: the base model the adapter was trained on.
            path: the directory written by `save_pretrained`, or a Hub repo id ("org/name"): a local path
                wins; a repo id is fetched through huggingface_hub (see `lofit.adapters.hub.resolve_adapter_dir`).
            adapter_name: the name to load it under.
            is_trainable: False (default): the model is returned in eval mode with frozen vectors, for
                inference (as PEFT); True: in train mode with trainable vectors.
            revision: the Hub revision (branch, tag or commit) of a repo id.
            token: a Hub token (None: the saved login or HF_TOKEN).
            **kwargs: reserved for loaders of other sources; unknown ones are ignored.
        """
        if isinstance(base_model, LofitModel):
            raise AdapterStateError(
                "base_model is already a LofitModel; use model.load_adapter(path, adapter_name) instead"
            )
        check_base_model(base_model, "LofitModel.from_pretrained")
        check_adapter_name(adapter_name)
        check_adapter_path(path)
        if not isinstance(is_trainable, bool):
            raise LofitConfigError(f"is_trainable must be True or False, got {type(is_trainable).__name__}")
        from .hub import resolve_adapter_dir

        path = resolve_adapter_dir(path, revision, token)
        config, tensors = read_checked_adapter(base_model, path, None)  # before touching the base model
        model = cls(base_model, config, adapter_name)
        if not _is_peft_model(base_model):
            for param in model.model.parameters():
                param.requires_grad_(False)
        _copy_tensors(model, adapter_name, tensors, is_trainable)
        model.train(is_trainable)  # PEFT: eval mode for inference unless is_trainable
        return model

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the adapter and a generated model card to the Hub repo `repo_id` (created if missing).

        Keyword arguments: `adapter_name`, `commit_message`, `private`, `token`, `revision`, `create_pr`,
        `metrics` (shown in the card); see `lofit.adapters.hub.push_adapter`. Returns the commit info.
        """
        from .hub import push_adapter

        return push_adapter(self, repo_id, **kwargs)

    def merge_and_unload(
        self,
        adapter_name: str | None = None,
        progressbar: bool = False,
        safe_merge: bool = True,
        **kwargs: Any,
    ) -> nn.Module:
        """Fold the adapter into the projections' weights and biases; return a plain transformers model.

        The result is what its config says: `save_pretrained` + `AutoModelForCausalLM.from_pretrained`
        (without lofit) gives the adapted logits. Offsets become output-projection biases, so the
        config's bias switch is turned on (with zero biases where it implies them), or, for Mistral,
        Qwen2 and Phi-3 (whose o_proj cannot hold a bias), an equivalent `LlamaForCausalLM` is returned
        (see `lofit.adapters.merged`). Anything that cannot be expressed is refused before a weight changes.
        The LM head keeps the pre-hook of `lofit.adapters.lm_head` (fast frozen-weight generation).

        Args:
            adapter_name: the adapter to fold; None folds the active one.
            progressbar, safe_merge, **kwargs: PEFT's arguments, accepted for compatibility (the merge
                always checks for NaN/inf before writing).

        Returns:
            The merged transformers model (the wrapped class, or `LlamaForCausalLM`).
        """
        name = self._check_adapter(adapter_name)
        plan = self._plan_merge(name)
        quantized = sum(
            not p.get_base_layer().weight.dtype.is_floating_point
            for p in self.projections()
            if p.has_adapter(name)
        )
        merged = complete_merged_model(self._fold_and_unwrap(name), plan)
        add_contiguous_input_hook(merged)
        if quantized:
            warnings.warn(
                f"{quantized} adapted attention output projection(s) are quantised: only the offsets were "
                "merged, into their (float) bias; the quantised weights are unchanged",
                stacklevel=2,
            )
        return merged

    def _plan_merge(self, adapter_name: str) -> Any:
        for projection in self.projections():  # refuse before changing any layer
            refusal = projection.refusal(adapter_name)
            if refusal is not None:
                raise refusal
        new_biases = [
            name
            for name, projection in zip(self.site_names, self.projections(), strict=True)
            if projection.has_adapter(adapter_name)
            and projection.vectors(adapter_name).offset is not None
            and getattr(innermost(projection), "bias", None) is None
        ]
        return plan_merged_model(self.model, new_biases, site="attention")


def lofit_identity(model: nn.Module, geometry: HeadGeometry) -> dict[str, Any]:
    """The base-model identity a LoFiT adapter records: `base_model_identity` of its heads' projections."""
    sites = [site.name for site in geometry.sites]
    return base_model_identity(model, sites, num_heads=geometry.num_heads, head_dim=geometry.head_dim)


def read_checked_adapter(
    base_model: nn.Module, path: str | os.PathLike[str], geometry: HeadGeometry | None
) -> tuple[LofitConfig, dict[str, torch.Tensor]]:
    """Read an adapter directory and check it fits `base_model`; returns (config, tensors)."""
    config, saved_identity = read_adapter_config(path)
    geometry = geometry or find_output_projections(base_model, config.target_modules)
    source = state_file(path) or Path(path) / CONFIG_NAME
    check_same_base(saved_identity, lofit_identity(base_model, geometry), source)
    tensors = read_adapter_tensors(path, config, geometry.head_dim, compute_dtype(base_model))
    return LofitConfig(**{**config.__dict__, "init_std": 0.0}), tensors


class HeadParamsError(LofitValueError, KeyError):
    """`set_head_params` names a head the adapter does not edit, or an unknown part (a KeyError too)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AdapterStateError(LofitRuntimeError, TypeError):
    """A call that the model's state does not allow (e.g. wrapping a model that is already wrapped)."""


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype `model` computes in (float32 when it reports none, e.g. a quantised model)."""
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def check_base_model(base_model: object, owner: str) -> None:
    """Refuse anything but a torch module as the base model, naming what to pass instead."""
    if not isinstance(base_model, nn.Module):
        hint = (
            "; load it first, e.g. AutoModelForCausalLM.from_pretrained(name)"
            if isinstance(base_model, (str, os.PathLike))
            else ""
        )
        raise LofitConfigError(
            f"{owner} needs a transformers causal LM (a torch.nn.Module) as base model, got "
            f"{type(base_model).__name__}{hint}"
        )


MAX_NAME_LENGTH = 128


def check_adapter_name(adapter_name: object) -> None:
    """An adapter name is a non-empty, printable string without '.', surrounding spaces or line breaks.

    Example:
        >>> check_adapter_name("truthful")
        >>> try:
        ...     check_adapter_name("default\\n")
        ... except LofitConfigError as error:
        ...     print(str(error)[-15:])
        got 'default\\n'
    """
    if (
        not isinstance(adapter_name, str)
        or not adapter_name.strip()
        or adapter_name != adapter_name.strip()
        or not adapter_name.isprintable()
        or "." in adapter_name
        or len(adapter_name) > MAX_NAME_LENGTH
    ):
        shown = repr(adapter_name)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise LofitConfigError(
            f"adapter_name must be a non-empty printable name of at most {MAX_NAME_LENGTH} characters, "
            f"without '.', surrounding spaces or line breaks, e.g. 'default' or 'truthful'; got {shown}"
        )


def check_adapter_path(path: object) -> None:
    """Refuse an adapter path that is not a str/PathLike, or that holds a NUL byte (no file has one)."""
    if not isinstance(path, (str, os.PathLike)):
        raise LofitConfigError(
            f"the adapter path must be a directory path or a Hub repo id, got {type(path).__name__}"
        )
    text = os.fspath(path)
    if "\x00" in str(text):
        raise LofitConfigError(
            f"the adapter path {str(text)[:60]!r} holds a NUL byte, which no path can contain; pass the directory "
            "written by save_pretrained"
        )


def _copy_tensors(
    model: LofitModel, adapter_name: str, tensors: dict[str, torch.Tensor], trainable: bool
) -> None:
    with torch.no_grad():
        for layer, vectors in model.adapter_vectors(adapter_name).items():
            for kind in ("scale", "offset"):
                param = getattr(vectors, kind)
                if param is not None:
                    param.copy_(tensors[f"layers.{layer}.{kind}"].to(param))
    for param in model.adapter_parameters(adapter_name):
        param.requires_grad_(trainable)


def get_lofit_model(base_model: nn.Module, config: LofitConfig, adapter_name: str = "default") -> LofitModel:
    """Wrap `base_model` with a trainable LoFiT adapter; the base weights are frozen.

    A base that carries PEFT adapters (LoRA, ...) keeps its trainable flags as they are, so LoFiT and
    LoRA can train together; only the LoFiT vectors are switched on.

    Args:
        base_model: a transformers causal LM (or a PEFT model wrapping one).
        config: the adapter's configuration.
        adapter_name: its name.

    Returns:
        The `LofitModel`, with only the adapter's vectors trainable.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        >>> model = get_lofit_model(base, LofitConfig(heads={1: [0, 2]}))
        >>> model.count_parameters()[0]   # 2 heads x head_dim 8
        16
    """
    model = LofitModel(base_model, config, adapter_name)
    if _is_peft_model(base_model):
        for param in model.adapter_parameters(adapter_name):
            param.requires_grad_(True)
    else:
        model.set_trainable(adapter_name)
    return model
