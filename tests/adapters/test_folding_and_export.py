"""Merging adapters into the base weights and exporting plain transformers checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lofit import LofitConfig, get_lofit_model
from lofit.adapters.folding import MergeError
from lofit.integrations.export import export_merged, merge_adapter_checkpoint
from lofit.io.atomic import ForeignContentError
from tiny_models import ARCHITECTURES, VOCAB, tiny_model, tiny_tokenizer

SEED = 0
HEADS = {0: [0, 2], 2: [1, 3]}
# o_proj is hard-wired bias-free in these (no config switch): a merged offset makes them the equivalent Llama.
NO_OUTPUT_BIAS = {"mistral", "qwen2", "phi3"}


def input_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def adapted(arch: str, use_scale: bool = True, use_offset: bool = True, **base_config: object):  # type: ignore[no-untyped-def]
    base = tiny_model(arch, SEED)
    if base_config:
        torch.manual_seed(SEED)
        config = base.config
        for key, value in base_config.items():
            setattr(config, key, value)
        base = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model = get_lofit_model(
        base, LofitConfig(heads=HEADS, use_scale=use_scale, use_offset=use_offset, init_std=0.3)
    )
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_export_reloads_with_plain_transformers(arch: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = adapted(arch)
    expected = logits(model)
    merged = model.merge_and_unload()
    if arch in NO_OUTPUT_BIAS:  # they used to be refused (MergeError); now they export as Llama
        assert type(merged).__name__ == "LlamaForCausalLM" and merged.config.attention_bias is True
    out = export_merged(merged, tmp_path / "out", tiny_tokenizer())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded) is type(merged)
    assert (logits(reloaded) - expected).abs().max().item() <= 1e-5
    assert AutoTokenizer.from_pretrained(out).eos_token == "</s>"


@pytest.mark.parametrize("arch", sorted(NO_OUTPUT_BIAS))
def test_scale_only_adapters_export_everywhere(arch: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = adapted(arch, use_offset=False)
    expected = logits(model)
    out = export_merged(model.merge_and_unload(), tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert (logits(reloaded) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("arch", "switch"), [("gpt_neox", "attention_bias"), ("opt", "enable_bias")])
def test_bias_switch_turned_on_when_base_has_no_biases(arch: str, switch: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = adapted(arch, **{switch: False})
    assert all(p.base_layer.bias is None for p in model.projections())
    expected = logits(model)
    adapted_layers = len(model.selected_heads())
    merged = model.merge_and_unload()
    # The merged model is what its config says (it used to keep the switch off with extra biases, which
    # save_pretrained dropped): the switch is on, and its state dict holds every bias the switch implies.
    # In memory only the adapted output projections gain a bias (the others are implicit zeros).
    assert getattr(merged.config, switch) is True
    names_before = [name for name, _ in merged.named_parameters()]
    switched_off = copy.deepcopy(merged.config)
    setattr(switched_off, switch, False)
    extra = {name for name in names_before if name.endswith(".bias")} - {
        name for name, _ in AutoModelForCausalLM.from_config(switched_off).named_parameters()
    }
    assert len(extra) == adapted_layers
    assert set(merged.state_dict()) == set(AutoModelForCausalLM.from_config(merged.config).state_dict())
    out = export_merged(merged, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())[switch] is True
    assert [name for name, _ in merged.named_parameters()] == names_before
    assert (logits(merged) - expected).abs().max().item() <= 1e-5
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert (logits(reloaded) - expected).abs().max().item() <= 1e-5


def test_export_into_existing_directory_needs_overwrite_for_another_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    (out / "config.json").write_text("{stale")
    model = adapted("llama")
    expected = logits(model)
    merged = model.merge_and_unload()
    with pytest.raises(ForeignContentError, match=r"config.json.*overwrite=True"):
        export_merged(merged, out)  # a config.json lofit did not write: another model's
    assert (out / "config.json").read_text() == "{stale"
    export_merged(merged, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "kept"
    export_merged(merged, out)  # lofit's own checkpoint: replaced without overwrite
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (logits(reloaded) - expected).abs().max().item() <= 1e-5
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        export_merged(adapted("llama").merge_and_unload(), tmp_path / "file")


def test_merge_refuses_non_finite_vectors() -> None:
    model = adapted("llama")
    with torch.no_grad():
        model.adapter_parameters(kind="offset")[0][0, 0] = float("nan")
    with pytest.raises(MergeError, match="NaN"):
        model.merge_and_unload()


def test_merge_adapter_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base_dir = tmp_path / "base"
    tiny_model("llama", SEED).save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = adapted("llama")
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")

    out = merge_adapter_checkpoint(str(base_dir), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert out == tmp_path / "merged"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (logits(reloaded) - expected).abs().max().item() <= 1e-5
    assert AutoTokenizer.from_pretrained(out).pad_token == "<pad>"

    # An adapter for another base is refused before anything is written.
    other_dir = tmp_path / "other"
    tiny_model("llama", seed=1).save_pretrained(other_dir)
    tiny_tokenizer().save_pretrained(other_dir)
    with pytest.raises(ValueError, match="differ"):
        merge_adapter_checkpoint(str(other_dir), str(tmp_path / "adapter"), str(tmp_path / "merged2"))
    assert not (tmp_path / "merged2").exists()

    bf16 = merge_adapter_checkpoint(
        str(base_dir), str(tmp_path / "adapter"), str(tmp_path / "bf16"), dtype=torch.bfloat16
    )
    reloaded = AutoModelForCausalLM.from_pretrained(bf16).eval()
    assert reloaded.dtype == torch.bfloat16
    assert (logits(reloaded).float() - expected).abs().max().item() < 0.1
