"""RED (Wu et al. 2024, "Advancing Parameter Efficiency in Fine-tuning via Representation Editing").

Each decoder layer learns a scale s and a bias b (hidden size each) that edit one representation:
h <- h ⊙ (1 + s) + b. lofit's baseline edits the attention output (the output of the attention output
projection, `site="attention"`, as issue #7 specifies); the RED paper and code edit the FFN output
(the output of `down_proj`, `site="mlp"`). RED's code stores the scale itself, initialised to ones; we
store s = scale − 1, initialised to zeros, in fp32 (the same function, exact identity at init, and 1 + s
keeps its precision when the model runs in bf16).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import __version__
from ..atomic import atomic_write_json, atomic_write_with
from ..errors import AdapterLoadError, BaseModelMismatchError, LofitValueError
from ..fingerprint import FINGERPRINT_RTOL, projection_fingerprint
from ..heads import OUTPUT_PROJECTION_SUFFIXES, text_config
from ..wrappers import Fp32Parameters, PassThroughModel

CONFIG_NAME = "red_config.json"
WEIGHTS_NAME = "red_model.safetensors"
FORMAT_NAME = "lofit-red"
FORMAT_VERSION = 1
RED_SITES = ("attention", "mlp")

# model_type -> suffix of the module whose output is the FFN output (RED's own placement).
MLP_OUTPUT_SUFFIXES: dict[str, str] = {
    **{
        t: "mlp.down_proj"
        for t in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "olmo",
            "olmo2",
            "granite",
            "cohere",
            "stablelm",
            "smollm3",
        )
    },
    "phi": "mlp.fc2",
    "gpt2": "mlp.c_proj",
    "gpt_bigcode": "mlp.c_proj",
    "gpt_neox": "mlp.dense_4h_to_h",
    "gptj": "mlp.fc_out",
    "opt": "fc2",
    "falcon": "mlp.dense_4h_to_h",
    "bloom": "mlp.dense_4h_to_h",
    "starcoder2": "mlp.c_proj",
}


class RedConfigError(LofitValueError):
    """A RED configuration is invalid or does not fit the model; the message says what to change."""


@dataclass
class RedConfig:
    """Where RED edits the representation.

    >>> RedConfig(site="mlp").site
    'mlp'
    """

    site: str = field(
        default="attention",
        metadata={"help": "'attention': output of the attention output projection; 'mlp': FFN output"},
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "module-name suffixes of the edited projection; None = auto-detect from site"},
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


# ------------------------------------------------------------------------------------- sites
def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def projection_out_features(module: nn.Module) -> int:
    """Output width of an nn.Linear or of GPT-2's transposed Conv1D (weight [in, out])."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":
        return int(_weight(module).shape[1])
    raise RedConfigError(
        f"module {type(module).__name__} is neither nn.Linear nor Conv1D; RED cannot edit its output. "
        "Pass target_modules naming a Linear projection"
    )


def find_red_sites(model: nn.Module, config: RedConfig) -> list[tuple[int, str]]:
    """(layer, qualified module name) of the edited projection in every decoder layer, in layer order."""
    model_type = str(getattr(text_config(getattr(model, "config", None)), "model_type", "unknown"))
    if config.target_modules is not None:
        targets = list(config.target_modules)
    else:
        table = OUTPUT_PROJECTION_SUFFIXES if config.site == "attention" else MLP_OUTPUT_SUFFIXES
        suffix = table.get(model_type)
        if suffix is None:
            raise RedConfigError(
                f"model_type {model_type!r} has no known {config.site} output module for RED; pass "
                "target_modules=['<suffix>'] (e.g. ['self_attn.o_proj'] or ['mlp.down_proj'])"
            )
        targets = [suffix]
    sites = []
    for name, _ in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets):
            numbers = re.findall(r"\.(\d+)\.", name + ".")
            if not numbers:
                raise RedConfigError(f"cannot read a layer index from module name {name!r}")
            sites.append((int(numbers[-1]), name))
    sites.sort()
    layers = [layer for layer, _ in sites]
    if not sites or layers != list(range(len(sites))):
        raise RedConfigError(
            f"target_modules={targets} matched layers {layers} of this {model_type!r} model; expected exactly "
            "one module per decoder layer. Pass the suffix of one projection per layer"
        )
    return sites


# ------------------------------------------------------------------------------------- layer
class RedProjection(Fp32Parameters):
    """Wraps a projection; returns its output h as h ⊙ (1 + red_scale) + red_bias."""

    def __init__(self, base_layer: nn.Module, layer_index: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        width = projection_out_features(base_layer)
        device = _weight(base_layer).device
        self.red_scale = nn.Parameter(torch.zeros(width, dtype=torch.float32, device=device))
        self.red_bias = nn.Parameter(torch.zeros(width, dtype=torch.float32, device=device))
        self.red_disabled = False

    @property
    def weight(self) -> torch.Tensor:
        return _weight(self.base_layer)

    @property
    def bias(self) -> torch.Tensor | None:
        return _bias(self.base_layer)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        output = self.base_layer(hidden, *args, **kwargs)
        if self.red_disabled:
            return output
        # In fp32: in bf16, 1 + 1e-3 rounds to 1. At init this is x * 1 + 0, bit-exact.
        return (output.float() * (1.0 + self.red_scale) + self.red_bias).to(output.dtype)

    def merge_into_base(self) -> nn.Module:
        """Fold the edit into base_layer (rows of W scaled, bias = (1 + s) ⊙ c + b); return base_layer."""
        layer = self.base_layer
        weight = _weight(layer)
        if not weight.dtype.is_floating_point:
            raise RedConfigError(
                f"{type(layer).__name__} has {weight.dtype} (quantised) weights; RED cannot be merged into them"
            )
        is_conv1d = type(layer).__name__ == "Conv1D"
        with torch.no_grad():
            factor = 1.0 + self.red_scale.to(weight.device)
            matrix = weight.float().t() if is_conv1d else weight.float()  # [out, in]
            new_matrix = matrix * factor[:, None]
            bias = _bias(layer)
            old_bias = bias.float() if bias is not None else torch.zeros_like(factor)
            new_bias = old_bias * factor + self.red_bias.to(weight.device)
            if not (torch.isfinite(new_matrix).all() and torch.isfinite(new_bias).all()):
                raise RedConfigError("merging produced NaN/inf values; the RED vectors are not finite")
            weight.copy_((new_matrix.t() if is_conv1d else new_matrix).to(weight.dtype))
            if bias is None:
                bias = nn.Parameter(torch.zeros_like(new_bias, dtype=weight.dtype), requires_grad=False)
                layer.bias = bias
            bias.copy_(new_bias.to(bias.dtype))
        return layer


# ------------------------------------------------------------------------------------- model
class RedModel(PassThroughModel):
    """A base model whose attention (or FFN) outputs carry RED's scale and bias.

    `forward`, `generate` and every other attribute pass through to the base model.
    """

    def __init__(self, base_model: nn.Module, config: RedConfig | None = None) -> None:
        super().__init__()
        self.base_model = base_model
        self.red_config = config or RedConfig()
        self.site_names = [name for _, name in find_red_sites(base_model, self.red_config)]
        for layer, name in enumerate(self.site_names):
            module = base_model.get_submodule(name)
            if isinstance(module, RedProjection):
                raise RedConfigError(f"{name} already carries RED; use that RedModel instead")
            parent_name, _, child = name.rpartition(".")
            setattr(base_model.get_submodule(parent_name), child, RedProjection(module, layer))

    def projections(self) -> list[RedProjection]:
        wrapped = [self.base_model.get_submodule(name) for name in self.site_names]
        assert all(isinstance(m, RedProjection) for m in wrapped)
        return wrapped  # type: ignore[return-value]

    def red_parameters(self) -> list[nn.Parameter]:
        return [p for projection in self.projections() for p in (projection.red_scale, projection.red_bias)]

    def set_trainable(self) -> None:
        """Freeze the base model; train only the RED vectors."""
        for param in self.parameters():
            param.requires_grad_(False)
        for param in self.red_parameters():
            param.requires_grad_(True)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model behaves exactly like the base model."""
        projections = self.projections()
        previous = [p.red_disabled for p in projections]
        for projection in projections:
            projection.red_disabled = True
        try:
            yield
        finally:
            for projection, flag in zip(projections, previous, strict=True):
                projection.red_disabled = flag

    def get_red_params(self) -> dict[int, dict[str, torch.Tensor]]:
        """{layer: {"scale": s, "bias": b}} (the factor applied is 1 + s)."""
        return {
            p.layer_index: {"scale": p.red_scale.detach().clone(), "bias": p.red_bias.detach().clone()}
            for p in self.projections()
        }

    def set_red_params(self, params: dict[int, dict[str, torch.Tensor]]) -> None:
        """Inverse of `get_red_params` (a subset of layers and of "scale"/"bias" is fine)."""
        projections = self.projections()
        with torch.no_grad():
            for layer, entry in params.items():
                if not 0 <= layer < len(projections):
                    raise KeyError(
                        f"layer {layer} is out of range; this model has layers 0..{len(projections) - 1}"
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

    def count_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.count_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ----------------------------------------------------------------------------- merge / unload
    def merge_and_unload(self) -> nn.Module:
        """Fold RED into the projections' weights and biases; return the plain base model."""
        for name, projection in zip(self.site_names, self.projections(), strict=True):
            parent_name, _, child = name.rpartition(".")
            setattr(self.base_model.get_submodule(parent_name), child, projection.merge_into_base())
        _record_new_biases(self.base_model, self.red_config.site)
        return self.base_model

    def unload(self) -> nn.Module:
        """Remove RED without merging; return the plain base model."""
        for name, projection in zip(self.site_names, self.projections(), strict=True):
            parent_name, _, child = name.rpartition(".")
            setattr(self.base_model.get_submodule(parent_name), child, projection.base_layer)
        return self.base_model

    # ------------------------------------------------------------------------------ save / load
    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write `red_config.json` and `red_model.safetensors` (atomically) into `path`."""
        directory = Path(path)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"{directory} exists and is not a directory; choose another output path")
        tensors: dict[str, torch.Tensor] = {}
        for projection in self.projections():
            for kind in ("scale", "bias"):
                values = getattr(projection, f"red_{kind}").detach().float().cpu().contiguous()
                if not torch.isfinite(values).all():
                    raise ValueError(
                        f"RED layer {projection.layer_index} {kind} holds NaN/inf; refusing to save"
                    )
                tensors[f"layers.{projection.layer_index}.{kind}"] = values
        document = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "lofit_version": __version__,
            "red": asdict(self.red_config),
            "base_model": self._identity(),
        }
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_with(
            directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"})
        )
        atomic_write_json(directory / CONFIG_NAME, document)

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, path: str | os.PathLike[str], is_trainable: bool = False
    ) -> RedModel:
        """Wrap `base_model` and load RED vectors saved by `save_pretrained`."""
        config, identity = _read_config(Path(path))
        model = cls(base_model, config)
        _check_same_base(identity, model._identity(), Path(path) / CONFIG_NAME)
        tensors = _read_tensors(Path(path) / WEIGHTS_NAME)
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

    def _identity(self) -> dict[str, Any]:
        config = text_config(getattr(self.base_model, "config", None))
        projections = self.projections()
        return {
            "model_type": str(getattr(config, "model_type", "unknown")),
            "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
            "num_layers": len(projections),
            "width": projection_out_features(projections[0].base_layer),
            "sites": self.site_names,
            "projection_fingerprint": [_fingerprint(p.base_layer) for p in projections],
        }


def _fingerprint(module: nn.Module) -> list[float] | None:
    weight = _weight(module)
    return projection_fingerprint(weight.t() if type(module).__name__ == "Conv1D" else weight)


def _read_config(directory: Path) -> tuple[RedConfig, dict[str, Any]]:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found; pass the directory written by RedModel.save_pretrained"
        )
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterLoadError(f"{config_path}: not valid JSON ({error}); the file is corrupt") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise AdapterLoadError(f'{config_path}: not a RED adapter config (missing "format": "{FORMAT_NAME}")')
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterLoadError(
            f"{config_path}: format_version {version!r} is not supported (supports <= {FORMAT_VERSION}); upgrade lofit"
        )
    if not isinstance(document.get("red"), dict) or not isinstance(document.get("base_model"), dict):
        raise AdapterLoadError(f"{config_path}: field 'red' or 'base_model' is missing or not an object")
    try:
        config = RedConfig(**document["red"])
    except (RedConfigError, TypeError) as error:
        raise AdapterLoadError(f"{config_path}: field 'red' is invalid: {error}") from None
    return config, document["base_model"]


def _read_tensors(weights_path: Path) -> dict[str, torch.Tensor]:
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"{weights_path} not found; pass the directory written by RedModel.save_pretrained"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterLoadError(
            f"{weights_path}: cannot read safetensors ({error}); the file is corrupt"
        ) from None
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise AdapterLoadError(f"{weights_path}: tensor {key!r} holds NaN or inf values")
    return tensors


def _check_same_base(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    for key in ("model_type", "num_layers", "width", "sites"):
        if saved.get(key) != current.get(key):
            raise BaseModelMismatchError(
                f"{source}: this RED adapter was trained for a {saved.get('model_type')} model "
                f"({saved.get('name_or_path') or 'unnamed'}) with {key}={saved.get(key)}, but the base model given "
                f"has {key}={current.get(key)}; load it onto the base model it was trained on"
            )
    for layer, (old, new) in enumerate(
        zip(saved.get("projection_fingerprint") or [], current["projection_fingerprint"], strict=False)
    ):
        if old is None or new is None:
            continue
        tolerance = FINGERPRINT_RTOL * max(abs(old[0]), 1e-12)
        if any(abs(a - b) > tolerance for a, b in zip(old, new, strict=True)):
            raise BaseModelMismatchError(
                f"{source}: the base model's weights in layer {layer} differ from those this RED adapter was "
                "trained on; it is a different (or already merged) model. Load it onto its original base model"
            )


def _record_new_biases(base: nn.Module, site: str) -> None:
    # Merging gives the edited projections a bias. Where the config has a switch for such biases (Llama
    # family: attention_bias / mlp_bias), turn it on and give the switch's other projections exact zero
    # biases, so that save_pretrained + from_pretrained of the merged model round-trips.
    config = text_config(getattr(base, "config", None))
    flag, names = (
        ("attention_bias", ("q_proj", "k_proj", "v_proj", "o_proj"))
        if site == "attention"
        else ("mlp_bias", ("gate_proj", "up_proj", "down_proj"))
    )
    if not hasattr(config, flag) or getattr(config, flag):
        return
    setattr(config, flag, True)
    for name, module in base.named_modules():
        if isinstance(module, nn.Linear) and module.bias is None and name.rsplit(".", 1)[-1] in names:
            module.bias = nn.Parameter(
                torch.zeros(module.out_features, dtype=module.weight.dtype, device=module.weight.device),
                requires_grad=False,
            )


def get_red_model(
    base_model: nn.Module, site: str = "attention", target_modules: list[str] | None = None
) -> RedModel:
    """Wrap `base_model` with RED; only the `red_` vectors (2 x hidden per layer) are trainable.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    >>> get_red_model(base).count_parameters()[0]   # 2 vectors x hidden 32 x 2 layers
    128
    """
    model = RedModel(base_model, RedConfig(site=site, target_modules=target_modules))
    model.set_trainable()
    return model
