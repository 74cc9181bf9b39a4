"""Bigger-than-one-device paths on CPU: device_map loading, and a quantised base (a fake int8 projection
standing in for bitsandbytes): offsets train, merging folds only the bias (and says so), scales are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lofit.io.loading as loading
from lofit import LofitConfig, LofitModel, get_lofit_model
from lofit.adapters.folding import MergeError
from lofit.io.loading import ModelLoadError, check_placement, load_model
from lofit.training.offsets import train_offsets
from tiny_models import VOCAB, tiny_model, tiny_tokenizer

RECORDS = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(4) for b in range(3)]
HEADS = {0: [1], 2: [0, 3]}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def offsets(model: LofitModel) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.adapter_parameters()]


# ------------------------------------------------------------------------------------ device_map
def test_device_map_auto_loads_and_trains_like_a_plain_load(saved_model: Path) -> None:
    mapped, tok = load_model(saved_model, device_map="auto")  # one CPU here: everything lands on it
    assert {p.device.type for p in mapped.parameters()} == {"cpu"}
    plain, _ = load_model(saved_model)
    kwargs = {"epochs": 1, "batch_size": 4, "progress": False}
    a = train_offsets(mapped, tok, RECORDS, HEADS, **kwargs)
    b = train_offsets(plain, tok, RECORDS, HEADS, **kwargs)
    assert all(torch.equal(x, y) for x, y in zip(offsets(a), offsets(b), strict=True))


def test_device_and_device_map_together_are_refused(saved_model: Path) -> None:
    with pytest.raises(ValueError, match="either device or device_map"):
        load_model(saved_model, device="cpu", device_map="auto")


def test_offloaded_layers_are_refused_with_a_clear_message() -> None:
    model = nn.Linear(2, 2)
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu"}  # type: ignore[assignment]
    with pytest.raises(
        ModelLoadError, match=r"offloaded 1 module\(s\) to CPU/disk \(e\.g\. 'model\.layers\.1'\)"
    ):
        check_placement(model)
    model.hf_device_map = {"": "cpu"}  # type: ignore[assignment]
    check_placement(model)  # everything on the CPU is fine


def test_quantization_needs_bitsandbytes_and_a_gpu(
    saved_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match=r"quantization must be one of \['4bit', '8bit'\]"):
        load_model(saved_model, quantization="2bit")
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install 'lofit\[quantization\]'"):
        load_model(saved_model, quantization="4bit")
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        load_model(saved_model, quantization="8bit")


# -------------------------------------------------------------------------------- quantised base
class FakeInt8Linear(nn.Linear):
    """A weight-only int8 linear layer (per-row scales), like bitsandbytes' layers: non-float weight."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        scale = weight.abs().amax(1, keepdim=True) / 127
        self.weight = nn.Parameter((weight / scale).round().to(torch.int8), requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.float() * self.weight_scale, self.bias)


def quantized_llama() -> nn.Module:
    base = tiny_model("llama")
    for layer in base.model.layers:
        layer.self_attn.o_proj = FakeInt8Linear(layer.self_attn.o_proj)
    return base


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_offsets_train_on_a_quantised_base_and_merge_into_the_bias_only(tmp_path: Path) -> None:
    base = quantized_llama()
    packed = [layer.self_attn.o_proj.weight.clone() for layer in base.model.layers]
    model = train_offsets(
        base, tiny_tokenizer(), RECORDS, HEADS, epochs=2, batch_size=4, lr=0.1, progress=False
    )
    losses = model.training_history.losses()
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert max(p.detach().abs().max().item() for p in model.adapter_parameters()) > 0.05  # it learned

    model.save_pretrained(tmp_path / "adapter")  # a quantised base saves and reloads (no fingerprint)
    reloaded = LofitModel.from_pretrained(quantized_llama(), tmp_path / "adapter")
    expected = logits(model)
    assert torch.allclose(logits(reloaded), expected, atol=1e-6)

    with pytest.warns(
        UserWarning, match=r"2 adapted attention output projection\(s\) are quantised: only the offsets"
    ):
        merged = model.merge_and_unload()
    assert torch.allclose(logits(merged), expected, atol=1e-5)
    for layer, before in zip(merged.model.layers, packed, strict=True):  # type: ignore[union-attr]
        projection = layer.self_attn.o_proj
        assert isinstance(projection, FakeInt8Linear) and torch.equal(projection.weight, before)
    biases = [layer.self_attn.o_proj.bias for layer in merged.model.layers]  # type: ignore[union-attr]
    assert biases[0] is not None and biases[0].dtype == torch.float32
    # No offset in layer 1: no bias there in memory; the config says attention_bias (the merged
    # model is what its config says, so save_pretrained keeps the offsets; it used to keep the switch off),
    # and the zero biases it implies are in the state dict that save_pretrained writes.
    assert biases[1] is None
    assert merged.config.attention_bias is True
    assert not merged.state_dict()["model.layers.1.self_attn.o_proj.bias"].any()


def test_merging_scales_into_a_quantised_base_is_refused_before_any_change() -> None:
    base = quantized_llama()
    model = get_lofit_model(base, LofitConfig(heads=HEADS, use_scale=True, use_offset=True, init_std=0.1))
    expected = logits(model)
    with pytest.raises(
        MergeError, match=r"FakeInt8Linear has torch\.int8 \(quantised\) weights; a scale would"
    ):
        model.merge_and_unload()
    assert torch.equal(logits(model), expected)  # still the intact adapted model
    assert all(layer.self_attn.o_proj.base_layer.bias is None for layer in base.model.layers)
