"""PEFT's names and manners on LofitModel, merge/unmerge on the layer, and LoFiT together with PEFT's LoRA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaModel

from lofit import LofitConfig, LofitModel, get_lofit_model
from lofit.adapters.base import AdapterNameError
from lofit.adapters.folding import MergeError
from lofit.adapters.layer import LofitProjection
from tiny_models import VOCAB, tiny_model

IDS = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
CONFIG = LofitConfig(heads={0: [1], 2: [0, 3]}, use_scale=True, init_std=0.3)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_peft_names() -> None:
    base = tiny_model("llama")
    base_logits = _logits(base)
    model = get_lofit_model(base, CONFIG)
    assert model.get_base_model() is base
    assert isinstance(model.base_model, LlamaModel)  # the decoder stack, as for the causal LM itself
    assert model(input_ids=IDS, output_hidden_states=True).hidden_states[-1].shape[-1] == 32
    hidden = model.base_model(input_ids=IDS).last_hidden_state  # what TRL calls; the adapter is applied
    assert torch.allclose(base.lm_head(hidden), _logits(model), atol=1e-6)
    assert (model.active_adapter, model.active_adapters) == ("default", ["default"])
    assert model.lofit_config == {"default": CONFIG}
    adapted = _logits(model)
    model.disable_adapter_layers()
    assert torch.equal(_logits(model), base_logits)
    model.enable_adapter_layers()
    assert torch.equal(_logits(model), adapted)
    with pytest.raises(AdapterNameError, match="no adapter named 'nope'"):
        model.set_adapter("nope")
    with pytest.raises(KeyError):  # still a KeyError for code written against it
        model.delete_adapter("nope")


def test_add_adapter_makes_only_the_new_adapter_trainable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = get_lofit_model(tiny_model("llama"), CONFIG)
    model.add_adapter("b", LofitConfig(heads={1: [2]}))
    assert model.active_adapter == "default"  # as in PEFT, adding does not switch
    assert all(not p.requires_grad for p in model.adapter_parameters("default"))
    assert all(p.requires_grad for p in model.adapter_parameters("b"))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.adapter_parameters("b")}
    model.save_pretrained(tmp_path / "b", adapter_name="b")
    # Loading keeps the other adapters' flags; the loaded one trains only with is_trainable.
    model.load_adapter(tmp_path / "b", "c")
    assert all(p.requires_grad for p in model.adapter_parameters("b"))
    assert all(not p.requires_grad for p in model.adapter_parameters("c"))
    assert model.active_adapters == ["c"] and model.lofit_config["c"].heads == {1: [2]}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layer_merge_and_unmerge(arch: str) -> None:
    model = get_lofit_model(tiny_model(arch), CONFIG)
    adapted = _logits(model)
    originals = [(p.weight.clone(), None if p.bias is None else p.bias.clone()) for p in model.projections()]
    model.merge_adapter()
    assert all(p.merged for p in model.projections() if p.has_adapter("default"))
    assert (_logits(model) - adapted).abs().max().item() <= 1e-5
    model.merge_adapter()  # merging twice is a no-op, not a double fold
    assert (_logits(model) - adapted).abs().max().item() <= 1e-5
    model.unmerge_adapter()  # exact: the original tensors are restored bit for bit
    for projection, (weight, bias) in zip(model.projections(), originals, strict=True):
        assert torch.equal(projection.weight, weight)
        assert (projection.bias is None) == (bias is None)
        if bias is not None:
            assert torch.equal(projection.bias, bias)
    assert torch.equal(_logits(model), adapted)
    # A merged adapter saves the identity of the unmerged base: it loads back onto the original base.
    model.merge_adapter()
    with torch.no_grad():
        assert not model.projections()[0].applies_adapter()


def test_layer_merge_refuses_non_finite_without_change() -> None:
    model = get_lofit_model(tiny_model("llama"), CONFIG)
    with torch.no_grad():
        model.adapter_parameters(kind="scale")[0][0, 0] = float("inf")
    projection = next(p for p in model.projections() if p.has_adapter("default"))
    weight = projection.weight.clone()
    with pytest.raises(MergeError, match="NaN/inf"):
        projection.merge()
    assert torch.equal(projection.weight, weight) and projection.bias is None and not projection.merged


def test_save_while_merged_records_the_original_base(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = get_lofit_model(tiny_model("llama"), CONFIG)
    adapted = _logits(model)
    model.merge_adapter()
    model.save_pretrained(tmp_path)
    loaded = LofitModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert (_logits(loaded) - adapted).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------- with PEFT
def _lora_model(targets: list[str]):  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=targets, lora_dropout=0.1, init_lora_weights=False)
    return get_peft_model(tiny_model("llama"), config)


def test_lofit_on_a_peft_model_keeps_lora_trainable_and_merges_exactly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("peft")
    peft_model = _lora_model(["o_proj", "q_proj"])  # LoRA wraps the very projection LoFiT edits
    flags = {id(p): p.requires_grad for p in peft_model.parameters()}
    model = get_lofit_model(peft_model, CONFIG)
    lofit = {id(p) for p in model.adapter_parameters()}
    for param in model.parameters():
        assert param.requires_grad == (True if id(param) in lofit else flags[id(param)])
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert all(p.grad is not None for p in model.adapter_parameters())
    model.eval()
    adapted = _logits(model)
    merged = model.merge_and_unload()  # used to be KeyError: "attribute 'bias' already exists"
    assert not any(isinstance(m, LofitProjection) for m in merged.modules())
    assert (_logits(merged) - adapted).abs().max().item() <= 1e-5
    plain = merged.merge_and_unload()  # peft's own merge: a plain Llama whose config has the bias
    assert plain.config.attention_bias is True
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert (_logits(reloaded) - adapted).abs().max().item() <= 1e-5


def test_peft_on_a_lofit_model_freezes_lofit_as_documented() -> None:
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    model = get_lofit_model(tiny_model("llama"), CONFIG)
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # PEFT freezes every parameter that is not its own, LoFiT's vectors included (PEFT's choice, which
    # lofit cannot change); switching them back on trains both.
    assert all(not p.requires_grad for p in model.adapter_parameters())
    for param in model.adapter_parameters():
        param.requires_grad_(True)
    wrapped.train()
    wrapped(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for p in model.adapter_parameters())
    assert any(p.grad is not None for n, p in wrapped.named_parameters() if "lora_" in n)


def test_scale_into_dora_is_refused() -> None:
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        tiny_model("llama"), LoraConfig(r=4, target_modules=["o_proj"], use_dora=True)
    )
    model = get_lofit_model(peft_model, CONFIG)
    with pytest.raises(MergeError, match="DoRA"):
        model.merge_and_unload()
    offsets = get_lofit_model(
        get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["o_proj"], use_dora=True)),
        LofitConfig(heads={0: [1]}, init_std=0.3),
    )
    adapted = _logits(offsets)
    assert (_logits(offsets.merge_and_unload()) - adapted).abs().max().item() <= 1e-5
