"""Merged models that are what their config says, so that `save_pretrained` keeps the adapter.

Merging an offset (LoFiT) or a RED bias gives the edited projections a bias. A plain transformers
checkpoint holds that bias only if the config says the projection has one, so after merging:

- where the config has a switch for it (`attention_bias` in Llama, Qwen3, Gemma; `enable_bias` in OPT;
  see `lofit.adapters.architectures.BIAS_SWITCHES`), the switch is turned on and every other projection it
  governs gets an exact zero bias. Those zeros are implicit, to keep the model in memory lean (no
  extra add per call): they appear in `state_dict()` (so in what `save_pretrained` writes) but not as
  parameters, and `load_state_dict` accepts them (a non-zero value becomes a real bias);
- where the class hard-wires the projection bias-free (Mistral, Qwen2, Phi-3), the model is converted to
  the `LlamaForCausalLM` with `attention_bias=True` that computes the same function, provided the
  config passes the checks in `llama_equivalence_problems` (no sliding window, default RoPE, full
  rotary; Phi-3's fused qkv/gate_up projections are split); otherwise the merge is refused.

`plan_merged_model` decides (and refuses) before any weight changes; `complete_merged_model` applies.

Example:
    >>> from transformers import Qwen2Config, Qwen2ForCausalLM
    >>> qwen = Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                                     num_attention_heads=2, num_key_value_heads=1, vocab_size=32))
    >>> plan_merged_model(qwen, ["model.layers.0.self_attn.o_proj"]).convert_to_llama
    True
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .architectures import BIAS_SWITCHES, LLAMA_EQUIVALENT
from .folding import MergeError, add_to_bias, compute_dtype, innermost
from .heads import module_tensor, text_config

_FALLBACK_SWITCHES = {"attention": ("attention_bias", "enable_bias"), "mlp": ("mlp_bias", "enable_bias")}


@dataclass(frozen=True)
class MergedModelPlan:
    """What `complete_merged_model` does: turn `switch` on, convert to Llama, or nothing."""

    switch: str | None = None
    convert_to_llama: bool = False
    llama_attention_bias: bool = True
    llama_mlp_bias: bool = False


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside `model` (a PEFT model's base model; else `model` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _plain_name(name: str) -> str:
    """A parameter name as plain transformers spells it (PEFT wrappers insert `.base_layer`)."""
    return name.replace(".base_layer.", ".")


def skeleton(model: nn.Module) -> nn.Module:
    """A parameter-free (meta) model built from `model`'s config, as plain transformers would build it."""
    from transformers import AutoModelForCausalLM

    config = getattr(model, "config", None)
    if config is None:
        raise MergeError(
            f"{type(model).__name__} has no Hugging Face config; only transformers models can be exported"
        )
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(copy.deepcopy(config))
    except (ValueError, KeyError, TypeError) as error:
        raise MergeError(
            f"AutoModelForCausalLM cannot build a {type(model).__name__} from its config ({error}); the merged "
            "model cannot be exported as a plain transformers checkpoint"
        ) from None


def _skeleton_biases(model: nn.Module, switch: str) -> set[str]:
    config = text_config(getattr(model, "config", None))
    previous = getattr(config, switch)
    setattr(config, switch, True)
    try:
        return {name for name, _ in skeleton(model).named_parameters() if name.endswith(".bias")}
    finally:
        setattr(config, switch, previous)


def plan_merged_model(
    model: nn.Module, new_bias_modules: list[str], site: str = "attention"
) -> MergedModelPlan:
    """Decide how the merged model will describe the biases that merging adds, or refuse.

    Args:
        model: the model before merging (projections may still be wrapped).
        new_bias_modules: qualified names of the projections that merging gives a bias.
        site: "attention" (output projection) or "mlp" (FFN output), for the config switch to use.

    Returns:
        The plan for `complete_merged_model`.

    Raises:
        MergeError: no switch and no exact Llama equivalent exists; nothing has been changed.
    """
    if not new_bias_modules:
        return MergedModelPlan()
    hf_model = transformers_model(model)
    config = text_config(getattr(hf_model, "config", None))
    model_type = str(getattr(config, "model_type", "unknown"))
    candidates = [BIAS_SWITCHES.get(model_type, {}).get(site), *_FALLBACK_SWITCHES[site]]
    hf_names = {id(module): name for name, module in hf_model.named_modules()}
    wanted = {_plain_name(hf_names[id(model.get_submodule(name))]) + ".bias" for name in new_bias_modules}
    for switch in [c for c in dict.fromkeys(candidates) if c is not None]:
        if getattr(config, switch, None) is False and wanted <= _skeleton_biases(hf_model, switch):
            return MergedModelPlan(switch=switch)
    if model_type in LLAMA_EQUIVALENT:
        problems = llama_equivalence_problems(config)
        if hf_model is not model:
            problems.append("the model is wrapped (e.g. by PEFT); merge or unload that wrapper first")
        if not problems:
            attention_bias = site == "attention" or model_type == "qwen2"  # Qwen2 has q/k/v biases
            return MergedModelPlan(
                convert_to_llama=True, llama_attention_bias=attention_bias, llama_mlp_bias=site == "mlp"
            )
        reason = "; ".join(problems)
    else:
        reason = f"no config switch of {model_type!r} gives the {site} output projection a bias"
    raise MergeError(
        f"the merged {site} offsets/biases cannot be expressed in a plain {type(hf_model).__name__} checkpoint: "
        f"{reason}. Serve the unmerged adapter (from_pretrained) instead, or fold it in place with "
        "merge_adapter() (the wrappers stay, nothing is saved), or train scales only"
    )


def llama_equivalence_problems(config: object) -> list[str]:
    """Why a Mistral/Qwen2/Phi-3 config is not exactly a Llama one (empty: it is)."""
    problems = []
    window = getattr(config, "sliding_window", None)
    if window is not None:
        problems.append(
            f"it uses sliding-window attention (sliding_window={window}), which "
            "Llama does not; set config.sliding_window = None first if you only serve contexts within the window"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "unknown"
    if rope_type != "default":
        problems.append(f"its RoPE type is {rope_type!r}; only the default RoPE is converted exactly")
    partial = rope.get("partial_rotary_factor", 1.0) if isinstance(rope, dict) else 1.0
    if partial != 1.0 or getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"it rotates only part of each head (partial_rotary_factor={partial})")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        problems.append(f"its layer_types are not all full attention ({sorted(set(layer_types))})")
    return problems


def complete_merged_model(model: nn.Module, plan: MergedModelPlan) -> nn.Module:
    """Make the merged (unwrapped) `model` agree with its config, as `plan` says; return the result.

    Returns:
        `model` itself (switch turned on, zero biases added) or a new `LlamaForCausalLM` (conversion).
    """
    if plan.convert_to_llama:
        return convert_to_llama(model, plan.llama_attention_bias, plan.llama_mlp_bias)
    if plan.switch is not None:
        hf_model = transformers_model(model)
        setattr(text_config(hf_model.config), plan.switch, True)
        present = {_plain_name(name) for name in hf_model.state_dict()}
        for name, _ in skeleton(hf_model).named_parameters():
            if name.endswith(".bias") and name not in present:
                add_implicit_zero_bias(_module_for(hf_model, name.rpartition(".")[0]))
    return model


def add_implicit_zero_bias(module: nn.Module) -> None:
    """Make `module` (without a bias) report an exact zero bias in `state_dict()`, and accept one on load.

    The module computes as before (no add per call); `save_pretrained` writes the zero bias its config
    implies, and loading a state dict with that bias works (a non-zero value becomes a real bias).

    Example:
        >>> layer = nn.Linear(3, 2, bias=False)
        >>> add_implicit_zero_bias(layer)
        >>> layer.bias is None, layer.state_dict()["bias"].tolist()
        (True, [0.0, 0.0])
        >>> _ = layer.load_state_dict({"weight": layer.weight.detach(), "bias": torch.ones(2)})
        >>> layer.bias.tolist()
        [1.0, 1.0]
    """
    if module.__dict__.get("_lofit_implicit_bias_dtype") is not None:
        return
    module.__dict__["_lofit_implicit_bias_dtype"] = compute_dtype(module)
    module.register_state_dict_post_hook(_report_zero_bias)
    module.register_load_state_dict_pre_hook(_accept_bias)


def _report_zero_bias(module: nn.Module, state_dict: dict[str, Any], prefix: str, metadata: Any) -> None:
    if getattr(module, "bias", None) is None:
        weight = module_tensor(module, "weight")
        dtype = module.__dict__["_lofit_implicit_bias_dtype"]
        state_dict[prefix + "bias"] = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device)


def _accept_bias(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    value = state_dict.get(prefix + "bias")
    if value is None or getattr(module, "bias", None) is not None:
        return
    if bool(torch.count_nonzero(value)):  # a real bias now: give the module one to load it into
        add_to_bias(module, torch.zeros(value.shape[0], device=value.device), value.dtype)
    else:
        del state_dict[prefix + "bias"]


def _module_for(model: nn.Module, plain_name: str) -> nn.Module:
    return innermost(model.get_submodule(plain_name))


def check_complete(model: nn.Module) -> None:
    """Raise MergeError unless a fresh model of this config has exactly `model`'s parameters.

    That is the condition for `AutoModelForCausalLM.from_pretrained` (without lofit) to load the saved
    model with nothing dropped and nothing left randomly initialised.
    """
    expected = {name: tuple(p.shape) for name, p in skeleton(model).state_dict().items()}
    actual = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise MergeError(
            f"the model has parameters {extra[:3]}{' ...' if len(extra) > 3 else ''} that a plain "
            f"{type(model).__name__} built from its config does not have, so save_pretrained would drop them "
            "(the merged offsets). Merge with LofitModel.merge_and_unload(), which writes them into the config"
        )
    missing = sorted(set(expected) - set(actual))
    mismatched = sorted(n for n in set(actual) & set(expected) if actual[n] != expected[n])
    if missing or mismatched:
        raise MergeError(
            f"a plain {type(model).__name__} built from the model's config has parameters "
            f"{(missing or mismatched)[:3]} that the model lacks or shapes differently; transformers "
            "would initialise them randomly on load, so the export is refused"
        )


# --------------------------------------------------------------------------- Llama conversion
def _llama_config(source: object, attention_bias: bool, mlp_bias: bool) -> object:
    from transformers import LlamaConfig

    fields = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_act",
        "max_position_embeddings",
        "initializer_range",
        "rms_norm_eps",
        "use_cache",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
        "rope_parameters",
        "attention_dropout",
    ]
    values = {name: copy.deepcopy(getattr(source, name)) for name in fields if hasattr(source, name)}
    num_heads = values["num_attention_heads"]
    head_dim = getattr(source, "head_dim", None) or values["hidden_size"] // num_heads
    config = LlamaConfig(**values, head_dim=head_dim, attention_bias=attention_bias, mlp_bias=mlp_bias)
    config._name_or_path = getattr(source, "_name_or_path", "")
    config._attn_implementation = getattr(source, "_attn_implementation", None)
    dtype = getattr(source, "dtype", None)
    if dtype is not None:
        config.dtype = dtype
    return config


def _llama_state_dict(model: nn.Module, config: object) -> dict[str, torch.Tensor]:
    """`model`'s tensors under Llama's names (Phi-3's fused projections split, clones not views)."""
    state: dict[str, torch.Tensor] = {}
    q_size = config.num_attention_heads * config.head_dim  # type: ignore[attr-defined]
    kv_size = config.num_key_value_heads * config.head_dim  # type: ignore[attr-defined]
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if name.endswith("self_attn.qkv_proj.weight"):
            stem = name[: -len("qkv_proj.weight")]
            q, k, v = tensor.split([q_size, kv_size, kv_size], dim=0)
            state.update({f"{stem}q_proj.weight": q.clone(), f"{stem}k_proj.weight": k.clone()})
            state[f"{stem}v_proj.weight"] = v.clone()
        elif name.endswith("mlp.gate_up_proj.weight"):
            stem = name[: -len("gate_up_proj.weight")]
            gate, up = tensor.chunk(2, dim=0)
            state.update({f"{stem}gate_proj.weight": gate.clone(), f"{stem}up_proj.weight": up.clone()})
        else:
            state[name] = tensor
    return state


def convert_to_llama(model: nn.Module, attention_bias: bool = True, mlp_bias: bool = False) -> nn.Module:
    """The `LlamaForCausalLM` computing exactly what the merged Mistral/Qwen2/Phi-3 `model` computes.

    Biases the Llama config implies but `model` lacks become exact zeros. Call only after
    `plan_merged_model` approved the conversion.

    Args:
        model: the merged (unwrapped) model.
        attention_bias: give q/k/v/o biases (needed for attention offsets and for Qwen2's q/k/v).
        mlp_bias: give gate/up/down biases (needed for RED on the FFN output).
    """
    from transformers import GenerationConfig, LlamaForCausalLM

    config = _llama_config(model.config, attention_bias, mlp_bias)
    state = _llama_state_dict(model, config)
    with torch.device("meta"):
        llama = LlamaForCausalLM(config)  # type: ignore[arg-type]
    for name, param in llama.named_parameters():
        if name not in state and name.endswith(".bias"):
            weight = state[name[: -len("bias")] + "weight"]
            state[name] = torch.zeros(param.shape[0], dtype=weight.dtype, device=weight.device)
    llama.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:  # type: ignore[attr-defined]
        llama.tie_weights()
    device = llama.get_input_embeddings().weight.device
    assert isinstance(device, torch.device)
    with torch.device(device):  # its inv_freq buffers are not in the state dict
        llama.model.rotary_emb = type(llama.model.rotary_emb)(config)
    still_meta = [
        name for name, p in [*llama.named_parameters(), *llama.named_buffers()] if p.device.type == "meta"
    ]
    if still_meta:
        raise MergeError(f"converting to Llama left parameters {still_meta[:3]} without values")
    llama.requires_grad_(False)
    llama.train(model.training)
    generation = getattr(model, "generation_config", None)
    if isinstance(generation, GenerationConfig):
        llama.generation_config = copy.deepcopy(generation)
    return llama
