"""Find each decoder layer's attention output projection and the head geometry feeding it.

The concatenation of all heads' outputs z (before W_O) is exactly the input of that projection, so
LoFiT acts on the projection's input, whatever the architecture calls the module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LofitValueError
from .architectures import OUTPUT_PROJECTION_SUFFIXES


class UnsupportedArchitectureError(LofitValueError):
    """The attention output projection could not be found; the message says what to pass."""


@dataclass(frozen=True)
class OutputProjectionSite:
    """One decoder layer's attention output projection.

    Args:
        layer: the decoder layer index.
        name: the module's qualified name inside the model.
        num_heads: heads feeding it.
        head_dim: width of each head's slice of its input.
    """

    layer: int
    name: str  # qualified module name inside the model
    num_heads: int
    head_dim: int


@dataclass(frozen=True)
class HeadGeometry:
    """Head layout shared by every adapted layer (from `find_output_projections` / `head_geometry`).

    Args:
        model_type: the config's `model_type`.
        num_layers: decoder layers (one site each).
        num_heads: heads per layer.
        head_dim: width of one head.
        sites: the output projection of every layer, in layer order.
    """

    model_type: str
    num_layers: int
    num_heads: int
    head_dim: int
    sites: tuple[OutputProjectionSite, ...]

    @property
    def total_heads(self) -> int:
        return self.num_layers * self.num_heads

    @property
    def target_suffix(self) -> str:
        return self.sites[0].name.rsplit(".", 2)[-2] + "." + self.sites[0].name.rsplit(".", 1)[-1]


def projection_in_features(module: nn.Module) -> int:
    """Input width of a Linear or of GPT-2's transposed Conv1D (weight [in, out])."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D":
        return int(module_tensor(module, "weight").shape[0])
    in_features = getattr(module, "in_features", None)
    if isinstance(in_features, int):
        return in_features
    raise UnsupportedArchitectureError(
        f"module {type(module).__name__} is neither nn.Linear nor Conv1D; LoFiT cannot read its input width"
    )


def projection_out_features(module: nn.Module) -> int:
    """Output width of a Linear or of GPT-2's transposed Conv1D (weight [in, out])."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":
        return int(module_tensor(module, "weight").shape[1])
    out_features = getattr(module, "out_features", None)
    if isinstance(out_features, int):
        return out_features
    raise UnsupportedArchitectureError(
        f"module {type(module).__name__} is neither nn.Linear nor Conv1D; lofit cannot read its output width. "
        "Pass target_modules naming a Linear projection"
    )


def text_config(config: object) -> object:
    """The config that describes the decoder (multimodal configs nest it)."""
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _config_head_counts(config: object) -> tuple[int, int | None]:
    num_heads = None
    for key in ("num_attention_heads", "n_head", "num_heads"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            num_heads = value
            break
    if num_heads is None:
        raise UnsupportedArchitectureError(
            "the model config has no num_attention_heads/n_head; LoFiT cannot tell the head count"
        )
    head_dim = getattr(config, "head_dim", None)
    return num_heads, head_dim if isinstance(head_dim, int) and head_dim > 0 else None


def layer_sites(
    model: nn.Module, targets: list[str], error: type[LofitValueError] = LofitValueError
) -> list[tuple[int, str]]:
    """(layer, qualified name) of the module matching `targets` in every decoder layer, in layer order.

    A name matches a target when it equals it or ends with "." + target. Exactly one module per layer,
    layers 0..L-1, must match; otherwise `error` says which layers did.

    Args:
        model: the model to search.
        targets: module-name suffixes, e.g. `["self_attn.o_proj"]`.
        error: the LofitValueError subclass to raise.

    Returns:
        The sites, sorted by layer.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> layer_sites(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2)), ["mlp.c_proj"])[1]
        (1, 'transformer.h.1.mlp.c_proj')
    """
    sites = []
    for name, _ in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets):
            numbers = re.findall(r"\.(\d+)\.", name + ".")
            if not numbers:
                raise error(f"cannot read a layer index from module name {name!r}; check target_modules")
            sites.append((int(numbers[-1]), name))
    sites.sort()
    layers = [layer for layer, _ in sites]
    model_type = getattr(text_config(getattr(model, "config", None)), "model_type", "unknown")
    if not sites:
        raise error(
            f"no module of this {model_type!r} model matches target_modules={targets}; expected exactly one "
            "module per decoder layer. Pass the suffix of the edited projection's name (for example "
            "'self_attn.o_proj')"
        )
    if layers != list(range(len(sites))):
        raise error(
            f"target_modules={targets} matched layers {layers} of this {model_type!r} model; expected exactly "
            "one module per decoder layer. Pass the suffix of one projection per layer (for example "
            "'self_attn.o_proj')"
        )
    return sites


def _default_targets(model: nn.Module, model_type: str) -> list[str]:
    suffix = OUTPUT_PROJECTION_SUFFIXES.get(model_type)
    if suffix is not None:
        return [suffix]
    candidates = [
        name
        for name, _ in model.named_modules()
        if re.search(r"(attn|attention)\.(o_proj|out_proj|dense|c_proj)$", name)
    ][:3]
    hint = f" Candidates found in this model: {candidates}." if candidates else ""
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} has no known attention output projection; pass "
        f"target_modules=['<suffix>'] (e.g. target_modules=['self_attn.o_proj']) naming the module "
        f"whose input is the concatenated head outputs.{hint}"
    )


def find_output_projections(model: nn.Module, target_modules: list[str] | None = None) -> HeadGeometry:
    """Locate the attention output projection of every decoder layer and the head layout feeding it.

    Args:
        model: a transformers causal LM (or a model wrapping one, e.g. a PEFT model).
        target_modules: suffixes of the projection's name; None looks the architecture up in
            `lofit.adapters.architectures.OUTPUT_PROJECTION_SUFFIXES`.

    Returns:
        The `HeadGeometry`: heads per layer, head width and one site per layer.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        ...                   num_key_value_heads=2, vocab_size=64)
        >>> find_output_projections(LlamaForCausalLM(cfg)).sites[1].name
        'model.layers.1.self_attn.o_proj'
    """
    config = text_config(getattr(model, "config", None))
    model_type = str(getattr(config, "model_type", "unknown"))
    targets = _default_targets(model, model_type) if target_modules is None else list(target_modules)
    num_heads, head_dim = _config_head_counts(config)
    sites: list[OutputProjectionSite] = []
    for layer, name in layer_sites(model, targets, UnsupportedArchitectureError):
        module = model.get_submodule(name)
        base = getattr(module, "base_layer", None)
        in_features = projection_in_features(base if base is not None else module)
        dim = head_dim if head_dim is not None else in_features // num_heads
        if num_heads * dim != in_features:
            raise UnsupportedArchitectureError(
                f"{name}: num_attention_heads ({num_heads}) x head_dim ({dim}) = {num_heads * dim} does not "
                f"match the projection's {in_features} input features; check target_modules or the config's head_dim"
            )
        sites.append(OutputProjectionSite(layer, name, num_heads, dim))
    return HeadGeometry(model_type, len(sites), num_heads, sites[0].head_dim, tuple(sites))


def head_geometry(model: nn.Module, target_modules: list[str] | None = None) -> HeadGeometry:
    """The head geometry of `model`, found once per model: a `LofitModel`'s own, else found now.

    Args:
        model: a `LofitModel` (its `geometry`, found when it was built) or a transformers model.
        target_modules: for a model that is not wrapped yet, the projection suffixes to honour.

    Returns:
        The `HeadGeometry`.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> head_geometry(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2))).head_dim
        4
    """
    geometry = model.__dict__.get("geometry")
    if isinstance(geometry, HeadGeometry):
        return geometry
    return find_output_projections(model, target_modules)


def module_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """`module.<name>` (a weight or bias), typed as a tensor."""
    value = getattr(module, name)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is {type(value).__name__}, not a tensor")
    return value


def projection_weight_matrix(module: nn.Module) -> torch.Tensor:
    """The projection's weight as [out_features, in_features] (transposing GPT-2's Conv1D)."""
    weight = module_tensor(module, "weight")
    return weight.t() if type(module).__name__ == "Conv1D" else weight
