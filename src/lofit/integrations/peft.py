"""A LoFiT adapter written as a PEFT adapter, where that is exact: offsets as PEFT's BEFT on the output projection.

LoFiT adds an offset v_h to head h's output z_h before the attention output projection W_O (and bias b):
W_O (z + v) + b = W_O z + (b + Σ_h W_O[:, h] v_h). So an offsets-only adapter is, exactly, a constant added
to the projection's output in each adapted layer: what PEFT's BEFT tuner (`peft.BeftConfig`, a learned bias
added to a Linear layer's output) stores. `export_peft_adapter` writes that bias per adapted layer, so that
`peft.PeftModel.from_pretrained(base, folder)` and `AutoPeftModelForCausalLM.from_pretrained(folder)` give
the LoFiT model's logits (up to float rounding: the sum is computed once in fp64 instead of inside the matmul).

Where it is exact, and where not:

- offsets on an `nn.Linear` output projection (llama, mistral, qwen2/3, gemma/gemma2, phi3, gpt_neox, opt,
  any number of key/value heads): exact;
- GPT-2 (`Conv1D` projection): BEFT takes only `nn.Linear` layers; refused;
- scales A (`use_scale=True`, the selection step): z_h <- (1 + A) z_h is not a constant. It equals PEFT's IA3
  on the value projection only where every query head has its own key/value head (no GQA: the value rows
  of a shared key/value head serve several query heads), and one PEFT adapter cannot hold IA3 and BEFT
  together; refused;
- a value-projection bias instead (softmax weights sum to one, so b_v reaches z unchanged) is exact too,
  but again only without GQA; the output-projection form above works for every model and is what is written;
- vLLM's LoRA loader: a LoRA delta B A z is linear in z and cannot add a constant; PEFT's `lora_bias=True`
  could, but vLLM dropped LoRA bias support, so no LoRA file vLLM loads is exact. Serve with lofit's own
  vLLM integration or a merged checkpoint (`lofit merge`).

Example:
    >>> import tempfile, torch, lofit, peft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> def base():
    ...     torch.manual_seed(0)
    ...     return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    >>> model = lofit.get_lofit_model(base(), lofit.LofitConfig(heads={1: [0, 2]}, init_std=0.5))
    >>> folder = tempfile.mkdtemp()
    >>> _ = export_peft_adapter(model, folder)
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> with torch.no_grad():
    ...     gap = peft.PeftModel.from_pretrained(base(), folder)(input_ids=ids).logits - model(input_ids=ids).logits
    >>> bool(gap.abs().max() < 1e-5)
    True
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapters.folding import MergeError, innermost
from ..adapters.heads import module_tensor
from ..adapters.model import LofitModel, _is_peft_model
from ..io.atomic import atomic_directory

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"


def peft_biases(model: LofitModel, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The constant each adapted output projection adds (Σ_h W_O[:, h] v_h), by module name, in fp32.

    Args:
        model: a LofitModel whose adapter learns offsets only.
        adapter_name: the adapter (None: the active one).

    Raises:
        MergeError: the adapter or the model cannot be written exactly as BEFT (see the module docstring).
    """
    name = model._check_adapter(adapter_name)
    config = model.adapter_configs[name]
    if config.use_scale:
        raise MergeError(
            "this adapter learns scales (use_scale=True): z <- (1 + A) z is no PEFT method on every architecture "
            "(IA3 on v_proj only without grouped key/value heads); export_peft_adapter writes offsets-only "
            "adapters (the offset-tuning step). Serve it with lofit or merge it (lofit merge)"
        )
    if _is_peft_model(model.get_base_model()):
        raise MergeError(
            "the base model carries PEFT adapters already; export the LoFiT adapter from a plain base"
        )
    geometry = model.geometry
    biases: dict[str, torch.Tensor] = {}
    for site_name, projection in zip(model.site_names, model.projections(), strict=True):
        if not projection.has_adapter(name):
            continue
        layer = innermost(projection)
        if not isinstance(layer, nn.Linear):
            raise MergeError(
                f"{site_name} is a {type(layer).__name__}, and PEFT's BEFT adds biases to nn.Linear layers only "
                f"(model_type {geometry.model_type!r}); serve this adapter with lofit or merge it (lofit merge)"
            )
        weight = module_tensor(layer, "weight")
        if not weight.dtype.is_floating_point:
            raise MergeError(f"{site_name} is quantised; export from a base loaded in a float dtype")
        vectors = projection.vectors(name)
        assert vectors.offset is not None
        heads = vectors.heads.tolist()
        columns = torch.cat(
            [torch.arange(h * geometry.head_dim, (h + 1) * geometry.head_dim) for h in heads]
        ).to(weight.device)
        delta = weight.detach()[:, columns].double() @ vectors.offset.detach().double().reshape(-1)
        biases[site_name] = delta.float().cpu().reshape(1, -1).contiguous()
    return biases


def export_peft_adapter(
    model: LofitModel, path: str | os.PathLike[str], adapter_name: str | None = None
) -> Path:
    """Write an offsets-only LoFiT adapter as PEFT's BEFT adapter (exact; see the module docstring).

    `peft.PeftModel.from_pretrained(base, path)` then gives the LoFiT model's logits; so does
    `peft.AutoPeftModelForCausalLM.from_pretrained(path)` when the base model was loaded from a name or path
    (recorded as `base_model_name_or_path`).

    Args:
        model: the LofitModel.
        path: the folder to write (atomically; never a symbolic link): `adapter_config.json` +
            `adapter_model.safetensors`; other files in it are kept.
        adapter_name: the adapter (None: the active one).

    Returns:
        The folder written.

    Raises:
        MergeError: scales, a `Conv1D` projection (GPT-2), a quantised projection or a PEFT-wrapped base.
    """
    import peft

    biases = peft_biases(model, adapter_name)
    name_or_path = getattr(model.get_base_model(), "name_or_path", "") or None
    config = peft.BeftConfig(
        target_modules=sorted(biases), task_type="CAUSAL_LM", base_model_name_or_path=name_or_path
    )
    document = config.to_dict()
    document["target_modules"] = sorted(biases)  # a set in memory; a sorted list on disk, as PEFT writes it
    tensors = {f"base_model.model.{site}.beft_bias": bias for site, bias in biases.items()}
    folder = Path(path)
    with atomic_directory(folder, policy="beside") as tmp:  # other files kept, as PEFT does
        save_file(tensors, str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG_NAME).write_text(
            json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8"
        )
    return folder
