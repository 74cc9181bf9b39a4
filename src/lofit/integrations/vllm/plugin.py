"""The `vllm.general_plugins` entry point: registers lofit's model classes with vLLM's `ModelRegistry`.

vLLM calls `register()` in every process it starts (front end, engine core, workers). Each lofit class is
registered lazily ("module:Class"), so nothing of lofit's model code is imported until an engine uses it.
An engine serves lofit adapters when its architecture is overridden to one of these names, which
`lofit_architecture` picks: `hf_overrides={"architectures": [lofit_architecture(...)]}`.
"""

from __future__ import annotations

from ...errors import LofitValueError

ARCHITECTURES = {
    "LlamaForCausalLM": "LofitLlamaForCausalLM",
    "Qwen2ForCausalLM": "LofitQwen2ForCausalLM",
    "MistralForCausalLM": "LofitMistralForCausalLM",
    "Qwen3ForCausalLM": "LofitQwen3ForCausalLM",
}
"""vLLM architecture of the base -> the lofit class that serves adapters on it."""


def lofit_architecture(base_architectures: list[str] | None) -> str:
    """The lofit architecture name for a base model's `architectures` (from its config.json).

    Example:
        >>> lofit_architecture(["Qwen2ForCausalLM"])
        'LofitQwen2ForCausalLM'
    """
    for name in base_architectures or []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
        if name in ARCHITECTURES.values():
            return name
    raise LofitValueError(
        f"the lofit vLLM plugin serves {sorted(ARCHITECTURES)}; this model is {base_architectures}. "
        "Serve a merged export (lofit merge) of it instead, one adapter per engine"
    )


def register() -> None:
    """Register every lofit model class with vLLM (idempotent)."""
    from vllm import ModelRegistry

    for name in ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"lofit.integrations.vllm.model_classes:{name}")
