"""RED (Wu et al. 2024, "Advancing Parameter Efficiency in Fine-tuning via Representation Editing").

Each decoder layer learns a scale s and a bias b (hidden size each) that edit one representation:
h <- h ⊙ (1 + s) + b. lofit's baseline edits the attention output (the output of the attention output
projection, `site="attention"`, lofit's default); the RED paper and code edit the FFN output
(the output of `down_proj`, `site="mlp"`). RED's code stores the scale itself, initialised to ones; we
store s = scale − 1, initialised to zeros, in fp32 (the same function, exact identity at init, and 1 + s
keeps its precision when the model runs in bf16).

RED is a config, a layer and a model on `lofit.adapters.base`, the machinery LoFiT uses: the same site
finding (`lofit.adapters.heads.layer_sites`, tables in `lofit.adapters.architectures`), file format code
(`lofit.adapters.persistence`), base-model check (`lofit.adapters.fingerprint`) and merged-model path (`lofit.adapters.merged`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..adapters.architectures import MLP_OUTPUT_SUFFIXES, OUTPUT_PROJECTION_SUFFIXES
from ..adapters.base import AdapterLayer, AdapterModel
from ..adapters.fingerprint import base_model_identity, check_same_base
from ..adapters.fingerprint_store import pack_identity, unpack_identity
from ..adapters.folding import MergeError, fold_output_edit, innermost
from ..adapters.heads import layer_sites, projection_out_features, text_config
from ..adapters.merged import complete_merged_model, plan_merged_model
from ..adapters.persistence import read_document, read_tensors, write_adapter_files
from ..adapters.wrappers import Fp32Parameters
from ..errors import AdapterLoadError, BaseModelMismatchError, LofitValueError

CONFIG_NAME = "red_config.json"
WEIGHTS_NAME = "red_model.safetensors"
FORMAT_NAME = "lofit-red"
FORMAT_VERSION = 2  # 2: the base fingerprint packed (`lofit.adapters.fingerprint_store`); 1 is still read
RED_SITES = ("attention", "mlp")
ADAPTER_NAME = "default"


class RedConfigError(LofitValueError):
    """A RED configuration is invalid or does not fit the model; the message says what to change."""


@dataclass
class RedConfig:
    """Where RED edits the representation.

    Args:
        site: "attention" (output of the attention output projection) or "mlp" (the FFN output).
        target_modules: suffixes of the edited projection's name; None looks `site` up in
            `lofit.adapters.architectures`.
        layers: the decoder layers to edit (PEFT's `layers_to_transform`), e.g. the upper half for the
            LoFiT paper's RED(Half); None edits every layer.

    Example:
        >>> RedConfig(site="mlp").site
        'mlp'
        >>> RedConfig(layers=[3, 2]).layers
        [2, 3]
    """

    site: str = field(
        default="attention",
        metadata={"help": "'attention': output of the attention output projection; 'mlp': FFN output"},
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "module-name suffixes of the edited projection; None = auto-detect from site"},
    )
    layers: list[int] | None = field(
        default=None,
        metadata={"help": "decoder layers to edit (e.g. the upper half: RED(Half)); None = every layer"},
    )

    def __post_init__(self) -> None:
        if self.site not in RED_SITES:
            raise RedConfigError(f"site must be one of {RED_SITES}, got {self.site!r}")
        if self.target_modules is not None and (
            not isinstance(self.target_modules, list)
            or not self.target_modules
            or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            raise RedConfigError(
                f"target_modules must be None or a non-empty list of module-name suffixes, got {self.target_modules!r}"
            )
        if self.layers is not None:
            layers = list(self.layers) if isinstance(self.layers, (list, tuple, range)) else None
            if (
                not layers
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
                or len(set(layers)) != len(layers)
            ):
                raise RedConfigError(
                    f"layers must be None or a non-empty list of distinct layer indices >= 0, got {self.layers!r}"
                )
            self.layers = sorted(layers)


def find_red_sites(model: nn.Module, config: RedConfig) -> list[tuple[int, str]]:
    """(layer, qualified module name) of the edited projection in each edited decoder layer, in order.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2))
        >>> find_red_sites(gpt2, RedConfig(site="mlp"))
        [(0, 'transformer.h.0.mlp.c_proj'), (1, 'transformer.h.1.mlp.c_proj')]
        >>> find_red_sites(gpt2, RedConfig(site="mlp", layers=[1]))
        [(1, 'transformer.h.1.mlp.c_proj')]
    """
    sites = _all_red_sites(model, config)
    if config.layers is None:
        return sites
    missing = sorted(set(config.layers) - {layer for layer, _ in sites})
    if missing:
        raise RedConfigError(
            f"layers {missing} do not exist: this model has decoder layers 0..{len(sites) - 1}; "
            "pass layers within that range"
        )
    return [(layer, name) for layer, name in sites if layer in config.layers]


def _all_red_sites(model: nn.Module, config: RedConfig) -> list[tuple[int, str]]:
    if config.target_modules is not None:
        return layer_sites(model, list(config.target_modules), RedConfigError)
    model_type = str(getattr(text_config(getattr(model, "config", None)), "model_type", "unknown"))
    table = OUTPUT_PROJECTION_SUFFIXES if config.site == "attention" else MLP_OUTPUT_SUFFIXES
    suffix = table.get(model_type)
    if suffix is None:
        raise RedConfigError(
            f"model_type {model_type!r} has no known {config.site} output module for RED; pass "
            "target_modules=['<suffix>'] (e.g. ['self_attn.o_proj'] or ['mlp.down_proj'])"
        )
    return layer_sites(model, [suffix], RedConfigError)


# ------------------------------------------------------------------------------------- layer
class RedProjection(AdapterLayer, Fp32Parameters):
    """Wraps a projection; returns its output h as h ⊙ (1 + red_scale) + red_bias.

    Example:
        >>> import torch
        >>> layer = RedProjection(torch.nn.Linear(3, 2), layer_index=0)
        >>> layer.active_adapter = "default"
        >>> x = torch.randn(4, 3)
        >>> bool(torch.equal(layer(x), layer.base_layer(x)))    # identity at init
        True
    """

    def __init__(self, base_layer: nn.Module, layer_index: int) -> None:
        super().__init__(base_layer, layer_index)
        width = projection_out_features(innermost(base_layer))
        device = self.weight.device
        self.red_scale = nn.Parameter(torch.zeros(width, dtype=torch.float32, device=device))
        self.red_bias = nn.Parameter(torch.zeros(width, dtype=torch.float32, device=device))

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name == ADAPTER_NAME

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [self.red_scale, self.red_bias] if adapter_name == ADAPTER_NAME else []

    def _fold(self, adapter_name: str) -> None:
        fold_output_edit(self.base_layer, 1.0 + self.red_scale.detach(), self.red_bias.detach())

    def refusal(self) -> MergeError | None:
        """Why RED cannot be folded into this projection (None if it can)."""
        layer = self.base_layer
        if innermost(layer) is layer and self.weight.dtype.is_floating_point:
            return None
        return MergeError(
            f"{type(layer).__name__} is quantised or wrapped; RED can only be merged into a plain float "
            "nn.Linear or Conv1D. Load the base model without quantization or other adapters to merge"
        )

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        output = self.base_layer(hidden, *args, **kwargs)
        if not self.applies_adapter():
            return output
        # In fp32: in bf16, 1 + 1e-3 rounds to 1. At init this is x * 1 + 0, bit-exact.
        return (output.float() * (1.0 + self.red_scale) + self.red_bias).to(output.dtype)


# ------------------------------------------------------------------------------------- model
class RedModel(AdapterModel):
    """A base model whose attention (or FFN) outputs carry RED's scale and bias.

    `forward`, `generate` and every other attribute pass through to the base model. One adapter,
    named "default".

    Args:
        base_model: a transformers causal LM.
        config: where to edit (default: the attention output).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        >>> RedModel(base, RedConfig(site="mlp")).site_names[0]
        'model.layers.0.mlp.down_proj'
    """

    layer_class = RedProjection

    def __init__(self, base_model: nn.Module, config: RedConfig | None = None) -> None:
        super().__init__(base_model)
        config = config or RedConfig()
        sites = find_red_sites(base_model, config)
        for _, name in sites:
            if isinstance(base_model.get_submodule(name), RedProjection):
                raise RedConfigError(f"{name} already carries RED; use that RedModel instead")
        self._wrap_sites(sites, RedProjection)
        self.adapter_configs[ADAPTER_NAME] = config
        self.set_adapter(ADAPTER_NAME)

    @property
    def red_config(self) -> RedConfig:
        config = self.adapter_configs[ADAPTER_NAME]
        assert isinstance(config, RedConfig)
        return config

    def projections(self) -> list[RedProjection]:
        return self.adapter_layers()  # type: ignore[return-value]

    def red_parameters(self) -> list[nn.Parameter]:
        """Every layer's scale and bias, in layer order."""
        return self.adapter_parameters(ADAPTER_NAME)

    def get_red_params(self) -> dict[int, dict[str, torch.Tensor]]:
        """{layer: {"scale": s, "bias": b}} (the factor applied is 1 + s)."""
        return {
            p.layer_index: {"scale": p.red_scale.detach().clone(), "bias": p.red_bias.detach().clone()}
            for p in self.projections()
        }

    def set_red_params(self, params: dict[int, dict[str, torch.Tensor]]) -> None:
        """Inverse of `get_red_params` (a subset of layers and of "scale"/"bias" is fine)."""
        projections = {p.layer_index: p for p in self.projections()}
        with torch.no_grad():
            for layer, entry in params.items():
                if layer not in projections:
                    raise KeyError(
                        f"layer {layer} carries no RED; this model edits layers {sorted(projections)}"
                    )
                for kind, value in entry.items():
                    if kind not in ("scale", "bias"):
                        raise KeyError(f"unknown RED parameter {kind!r}; expected 'scale' or 'bias'")
                    param = getattr(projections[layer], f"red_{kind}")
                    value = torch.as_tensor(value)
                    if value.shape != param.shape:
                        raise ValueError(
                            f"layer {layer} {kind}: expected shape {tuple(param.shape)}, got {tuple(value.shape)}"
                        )
                    param.copy_(value.to(param))

    # ----------------------------------------------------------------------------- merge / unload
    def merge_and_unload(self, **kwargs: Any) -> nn.Module:
        """Fold RED into the projections' weights and biases; return a plain transformers model.

        As for LoFiT (`lofit.adapters.merged`), the result is what its config says, so its `save_pretrained`
        keeps the edit: the config's bias switch is turned on, or Mistral/Qwen2/Phi-3 become the
        equivalent Llama; where neither is possible the merge is refused before a weight changes.
        """
        for projection in self.projections():
            refusal = projection.refusal()
            if refusal is not None:
                raise refusal
        new_biases = [
            name for name, p in zip(self.site_names, self.projections(), strict=True) if p.bias is None
        ]
        plan = plan_merged_model(self.model, new_biases, site=self.red_config.site)
        return complete_merged_model(self._fold_and_unwrap(ADAPTER_NAME), plan)

    # ------------------------------------------------------------------------------ save / load
    def save_pretrained(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write `red_config.json` and `red_model.safetensors` (atomically) into `path`."""
        tensors: dict[str, torch.Tensor] = {}
        for projection in self.projections():
            for kind in ("scale", "bias"):
                values = getattr(projection, f"red_{kind}").detach().float().cpu().contiguous()
                tensors[f"layers.{projection.layer_index}.{kind}"] = values
        document = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "lofit_version": __version__,
            "red": asdict(self.red_config),
        }
        document["base_model"], fingerprint = pack_identity(red_identity(self.model, self.site_names))
        write_adapter_files(path, document, {**tensors, **fingerprint}, CONFIG_NAME, WEIGHTS_NAME)

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, path: str | os.PathLike[str], is_trainable: bool = False, **kwargs: Any
    ) -> RedModel:
        """Wrap `base_model` and load RED vectors saved by `save_pretrained` (checked against the base)."""
        config, stored = _read_config(Path(path))
        sites = [name for _, name in find_red_sites(base_model, config)]
        tensors = read_tensors(path, WEIGHTS_NAME)
        identity = unpack_identity(stored, tensors, str(Path(path) / CONFIG_NAME))
        check_same_red_base(identity, red_identity(base_model, sites), Path(path) / CONFIG_NAME)
        model = cls(base_model, config)
        params: dict[int, dict[str, torch.Tensor]] = {}
        for projection in model.projections():
            entry = {}
            for kind in ("scale", "bias"):
                key = f"layers.{projection.layer_index}.{kind}"
                value = tensors.get(key)
                if value is None or value.shape != getattr(projection, f"red_{kind}").shape:
                    raise AdapterLoadError(
                        f"{Path(path) / WEIGHTS_NAME}: tensor {key!r} is missing or has the wrong shape"
                    )
                entry[kind] = value
            params[projection.layer_index] = entry
        model.set_red_params(params)
        for param in model.parameters():
            param.requires_grad_(False)
        if is_trainable:
            model.set_trainable()
        return model


# What a RED file's `base_model` must hold; files of earlier lofit builds lacked some of these.
RED_IDENTITY_FIELDS = (
    "model_type",
    "hidden_size",
    "vocab_size",
    "num_layers",
    "width",
    "sites",
    "weights_fingerprint",
)


def red_identity(model: nn.Module, site_names: list[str]) -> dict[str, Any]:
    """The base-model identity RED records: `base_model_identity` of the edited projections, their width."""
    width = projection_out_features(innermost(model.get_submodule(site_names[0])))
    return base_model_identity(model, site_names, width=width, sites=list(site_names))


def check_same_red_base(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    """Raise BaseModelMismatchError unless `current` is the base the RED adapter was saved for.

    The same check as LoFiT's (`lofit.adapters.fingerprint.check_same_base`, with its dtype tolerance), plus the
    edited sites and their width. A file missing any of `RED_IDENTITY_FIELDS` (written by an earlier lofit
    build) is refused with AdapterLoadError.
    """
    missing = [key for key in RED_IDENTITY_FIELDS if key not in saved]
    if missing:
        raise AdapterLoadError(
            f"{source}: its 'base_model' has no {', '.join(repr(k) for k in missing)}; it was written by an "
            "earlier lofit build, whose RED files did not record the whole base model. Train and save the RED "
            "adapter again with this version"
        )
    for key in ("width", "sites"):
        if saved.get(key) != current.get(key):
            raise BaseModelMismatchError(
                f"{source}: this RED adapter was trained for a {saved.get('model_type')} model "
                f"({saved.get('name_or_path') or 'unnamed'}) with {key}={saved.get(key)}, but the base model given "
                f"has {key}={current.get(key)}; load it onto the base model it was trained on"
            )
    check_same_base(saved, current, source)


def _read_config(directory: Path) -> tuple[RedConfig, dict[str, Any]]:
    config_path = directory / CONFIG_NAME
    document = read_document(directory, CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, "RED adapter")
    if not isinstance(document.get("red"), dict) or not isinstance(document.get("base_model"), dict):
        raise AdapterLoadError(f"{config_path}: field 'red' or 'base_model' is missing or not an object")
    try:
        config = RedConfig(**document["red"])
    except (RedConfigError, TypeError) as error:
        raise AdapterLoadError(f"{config_path}: field 'red' is invalid: {error}") from None
    return config, document["base_model"]


def get_red_model(
    base_model: nn.Module,
    site: str = "attention",
    target_modules: list[str] | None = None,
    layers: list[int] | None = None,
) -> RedModel:
    """Wrap `base_model` with RED; only the `red_` vectors (2 x hidden per edited layer) are trainable.

    Args:
        base_model: a transformers causal LM.
        site: "attention" (attention output projection) or "mlp" (FFN output).
        target_modules: suffixes of the edited projection; None looks the architecture up.
        layers: the decoder layers to edit; None edits every layer.

    Returns:
        The `RedModel` with the base frozen.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> get_red_model(LlamaForCausalLM(config)).count_parameters()[0]   # 2 vectors x hidden 32 x 2 layers
        128
        >>> get_red_model(LlamaForCausalLM(config), layers=[1]).count_parameters()[0]   # the upper half only
        64
    """
    model = RedModel(base_model, RedConfig(site=site, target_modules=target_modules, layers=layers))
    model.set_trainable()
    return model
