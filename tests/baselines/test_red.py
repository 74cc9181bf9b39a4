"""RED: identity at init, a raw-hook oracle, gradients, merge, save/load, on every tiny architecture."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lofit.adapters.folding import MergeError
from lofit.baselines import RedConfig, RedModel, RedProjection, get_red_model, trainable_parameters
from lofit.baselines.red import CONFIG_NAME, RED_IDENTITY_FIELDS, RedConfigError, find_red_sites, red_identity
from lofit.errors import AdapterLoadError, BaseModelMismatchError
from tiny_models import ARCHITECTURES, tiny_model

# Architectures whose config cannot give the FFN output projection a bias (and that are not Llama).
NO_FFN_BIAS = {("qwen3", "mlp"), ("gemma", "mlp"), ("gemma2", "mlp")}
IDS = torch.tensor([[5, 17, 33, 40, 2, 90, 61, 7], [12, 3, 3, 100, 45, 9, 27, 88]])
HIDDEN, LAYERS = 32, 3


def _random_params(model: RedModel, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return {
        layer: {
            "scale": 0.3 * torch.randn(HIDDEN, generator=generator),
            "bias": 0.3 * torch.randn(HIDDEN, generator=generator),
        }
        for layer in range(LAYERS)
    }


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_identity_at_init(model_type: str) -> None:
    base_logits = _logits(tiny_model(model_type))
    model = get_red_model(tiny_model(model_type))
    assert torch.equal(_logits(model), base_logits)  # bit-exact at init
    model.set_red_params(_random_params(model))
    with model.disable_adapter():
        assert torch.equal(_logits(model), base_logits)


@pytest.mark.parametrize("site", ["attention", "mlp"])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_oracle_and_merge(model_type: str, site: str) -> None:
    model = get_red_model(tiny_model(model_type), site=site)
    params = _random_params(model)
    model.set_red_params(params)
    # Oracle: a fresh base model, a hand-written forward hook on each edited module's output.
    oracle = tiny_model(model_type)
    base_logits = _logits(oracle)
    for layer, name in find_red_sites(oracle, model.red_config):
        s, b = params[layer]["scale"], params[layer]["bias"]
        oracle.get_submodule(name).register_forward_hook(lambda _m, _a, out, s=s, b=b: out * (1 + s) + b)
    got = _logits(model)
    assert (got - _logits(oracle)).abs().max().item() < 1e-5
    assert (got - base_logits).abs().max().item() > 1e-2
    if (model_type, site) in NO_FFN_BIAS:
        # A merged FFN bias has no place in these configs: refused before a weight changes (it used to
        # be merged in memory and silently dropped by save_pretrained); merge_adapter() folds in place.
        with pytest.raises(MergeError, match="no config switch"):
            model.merge_and_unload()
        assert torch.equal(_logits(model), got)
        model.merge_adapter()
        assert (_logits(model) - got).abs().max().item() < 1e-5
        model.unmerge_adapter()
        assert torch.equal(_logits(model), got)
        return
    merged = model.merge_and_unload()
    assert not any(isinstance(m, RedProjection) for m in merged.modules())
    assert (_logits(merged) - got).abs().max().item() < 1e-5


def test_sites_and_parameter_count() -> None:
    model = get_red_model(tiny_model("llama"))
    assert model.site_names == [f"model.layers.{i}.self_attn.o_proj" for i in range(LAYERS)]
    assert model.count_parameters()[0] == 2 * HIDDEN * LAYERS
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * LAYERS and all(
        name.rsplit(".", 1)[-1] in ("red_scale", "red_bias") for name in names
    )
    assert get_red_model(tiny_model("gpt2"), site="mlp").site_names[0] == "transformer.h.0.mlp.c_proj"
    assert get_red_model(tiny_model("opt"), site="mlp").site_names[0] == "model.decoder.layers.0.fc2"


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_only_red_parameters_get_gradients(model_type: str) -> None:
    model = get_red_model(tiny_model(model_type))
    model.set_red_params(_random_params(model))
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    red = {id(p) for p in model.red_parameters()}
    assert {id(p) for p in trainable_parameters(model)} == red
    for name, param in model.named_parameters():
        if id(param) in red:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_merged_llama_round_trips_through_from_pretrained(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = get_red_model(tiny_model("llama"))
    model.set_red_params(_random_params(model, seed=4))
    unmerged = _logits(model)
    merged = model.merge_and_unload()
    assert merged.config.attention_bias is True
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert (_logits(reloaded) - unmerged).abs().max().item() < 1e-5


def test_unload_restores_base() -> None:
    base_logits = _logits(tiny_model("gpt2"))
    model = get_red_model(tiny_model("gpt2"))
    model.set_red_params(_random_params(model))
    assert torch.equal(_logits(model.unload()), base_logits)


def test_save_and_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = get_red_model(tiny_model("qwen3"), site="mlp")
    model.set_red_params(_random_params(model, seed=5))
    want = _logits(model)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["red_config.json", "red_model.safetensors"]
    loaded = RedModel.from_pretrained(tiny_model("qwen3"), tmp_path)
    assert loaded.red_config.site == "mlp"
    assert torch.equal(_logits(loaded), want)
    assert trainable_parameters(loaded) == []
    trainable = RedModel.from_pretrained(tiny_model("qwen3"), tmp_path, is_trainable=True)
    assert len(trainable_parameters(trainable)) == 2 * LAYERS
    with pytest.raises(BaseModelMismatchError, match="differ"):
        RedModel.from_pretrained(tiny_model("qwen3", seed=1), tmp_path)
    with pytest.raises(BaseModelMismatchError, match="model_type"):
        RedModel.from_pretrained(tiny_model("llama"), tmp_path)
    document = json.loads((tmp_path / "red_config.json").read_text())
    document["format"] = "something-else"
    (tmp_path / "red_config.json").write_text(json.dumps(document))
    with pytest.raises(AdapterLoadError, match="not a RED adapter"):
        RedModel.from_pretrained(tiny_model("qwen3"), tmp_path)


def test_bf16_keeps_red_vectors_in_fp32() -> None:
    model = get_red_model(tiny_model("llama"))
    model.set_red_params({0: {"scale": torch.full((HIDDEN,), 1e-3)}})
    model.to(torch.bfloat16)
    projection = model.projections()[0]
    assert (
        projection.red_scale.dtype == torch.float32 and projection.base_layer.weight.dtype == torch.bfloat16
    )
    assert projection.red_scale[0].item() == pytest.approx(1e-3)
    assert _logits(model).dtype == torch.bfloat16


def test_errors_name_the_fix() -> None:
    with pytest.raises(RedConfigError, match="site must be one of"):
        get_red_model(tiny_model("llama"), site="ffn")
    with pytest.raises(RedConfigError, match="expected exactly one module per decoder layer"):
        get_red_model(tiny_model("llama"), target_modules=["nothing_here"])
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(RedConfigError, match="pass target_modules"):
        get_red_model(model)
    wrapped = get_red_model(tiny_model("llama"))
    with pytest.raises(RedConfigError, match="already carries RED"):
        get_red_model(wrapped.get_base_model())
    with pytest.raises(ValueError, match="expected shape"):
        wrapped.set_red_params({0: {"scale": torch.zeros(3)}})


def test_generate_passes_through() -> None:
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    base_tokens = tiny_model("llama").generate(IDS[:1], **kwargs)
    model = get_red_model(tiny_model("llama"))
    assert torch.equal(model.generate(IDS[:1], **kwargs), base_tokens)
    model.set_red_params(_random_params(model, seed=6))
    oracle = tiny_model("llama")
    for layer, name in find_red_sites(oracle, model.red_config):
        p = model.get_red_params()[layer]
        oracle.get_submodule(name).register_forward_hook(
            lambda _m, _a, out, s=p["scale"], b=p["bias"]: out * (1 + s) + b
        )
    assert torch.equal(model.generate(IDS[:1], **kwargs), oracle.generate(IDS[:1], **kwargs))


def test_red_base_check_tolerates_dtype_like_lofit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """RED's base check is lofit.adapters.fingerprint's: a large sampled weight rounded to bf16 still matches.

    RED's own check used to lack the dtype term: 100 x std rounded to bf16 moves by ~0.4 x std, more
    than its 2% x std slack, so the adapter was refused on the same model loaded in bf16.
    """
    base = tiny_model("llama")
    with torch.no_grad():
        for name in find_red_sites(base, RedConfig()):
            weight = base.get_submodule(name[1]).weight
            weight[0, 0] = 100 * weight.std()  # element 0 is one of the fingerprint's samples
    model = get_red_model(base)
    model.set_red_params(_random_params(model))
    model.save_pretrained(tmp_path)
    bf16_base = tiny_model("llama")
    with torch.no_grad():
        for name in find_red_sites(bf16_base, RedConfig()):
            weight = bf16_base.get_submodule(name[1]).weight
            weight[0, 0] = 100 * weight.std()
    loaded = RedModel.from_pretrained(bf16_base.to(torch.bfloat16), tmp_path)
    assert loaded.get_red_params()[0]["scale"].dtype == torch.float32
    # A merged base is refused, as for LoFiT (its config gained the bias the merge wrote).
    merged = get_red_model(tiny_model("llama"))
    merged.set_red_params(_random_params(merged))
    with pytest.raises(
        BaseModelMismatchError, match="attention_bias=False, but the base model given has attention_bias=True"
    ):
        RedModel.from_pretrained(merged.merge_and_unload(), tmp_path)


def test_red_on_some_layers_matches_a_hook_oracle_and_round_trips(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """RED(Half): `layers` edits only those decoder layers; the rest stay the base model's."""
    model = get_red_model(tiny_model("llama"), layers=[2, 1])
    assert model.red_config.layers == [1, 2] and [p.layer_index for p in model.projections()] == [1, 2]
    assert model.count_parameters()[0] == 2 * 2 * HIDDEN
    params = {layer: entry for layer, entry in _random_params(model, seed=7).items() if layer in (1, 2)}
    model.set_red_params(params)
    oracle = tiny_model("llama")
    for layer, name in find_red_sites(oracle, RedConfig()):  # every layer's site, hooked only where edited
        if layer in params:
            s, b = params[layer]["scale"], params[layer]["bias"]
            oracle.get_submodule(name).register_forward_hook(lambda _m, _a, out, s=s, b=b: out * (1 + s) + b)
    got = _logits(model)
    assert (got - _logits(oracle)).abs().max().item() < 1e-5
    assert not isinstance(model.get_base_model().model.layers[0].self_attn.o_proj, RedProjection)
    with pytest.raises(KeyError, match=r"layer 0 carries no RED; this model edits layers \[1, 2\]"):
        model.set_red_params({0: {"scale": torch.zeros(HIDDEN)}})
    model.save_pretrained(tmp_path)
    loaded = RedModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert loaded.red_config.layers == [1, 2] and torch.equal(_logits(loaded), got)
    assert (_logits(model.merge_and_unload()) - got).abs().max().item() < 1e-5


@pytest.mark.parametrize("layers", [[], [-1], [0, 0], [True], "1", [1.0]])
def test_red_layers_that_are_not_layer_indices_are_refused(layers) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RedConfigError, match="layers must be None or a non-empty list"):
        get_red_model(tiny_model("llama"), layers=layers)


def test_red_layers_beyond_the_model_name_its_range() -> None:
    base = tiny_model("llama")
    with pytest.raises(
        RedConfigError, match=r"layers \[3, 7\] do not exist: this model has decoder layers 0..2"
    ):
        get_red_model(base, layers=[0, 3, 7])
    assert not any(isinstance(m, RedProjection) for m in base.modules())  # refused before any wrap


def test_red_records_the_whole_base_so_loading_warns_of_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A RED adapter saved now records every base tensor (as LoFiT's does): loading it raises no "older
    lofit" warning, and a base that differs outside the edited projections is refused."""
    import warnings

    model = get_red_model(tiny_model("llama"), layers=[2])
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RedModel.from_pretrained(tiny_model("llama"), tmp_path)
    other = tiny_model("llama")
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # not a RED site
    with pytest.raises(BaseModelMismatchError, match="differ"):
        RedModel.from_pretrained(other, tmp_path)


@pytest.mark.parametrize("field", RED_IDENTITY_FIELDS)
def test_a_red_file_of_an_earlier_build_is_refused_naming_the_missing_field(tmp_path, field: str) -> None:  # type: ignore[no-untyped-def]
    get_red_model(tiny_model("llama"), layers=[1]).save_pretrained(tmp_path)
    document = json.loads((tmp_path / CONFIG_NAME).read_text())
    del document["base_model"][field]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(document))
    with pytest.raises(
        AdapterLoadError, match=rf"has no '{field}'.*earlier lofit build.*save the RED adapter again"
    ):
        RedModel.from_pretrained(tiny_model("llama"), tmp_path)


def test_red_and_lofit_record_the_same_identity_of_the_base() -> None:
    """One identity function: RED's record is LoFiT's for the same projections, plus RED's own sizes."""
    from lofit.adapters.heads import find_output_projections
    from lofit.adapters.model import lofit_identity

    base = tiny_model("llama")
    geometry = find_output_projections(base)
    lofit = lofit_identity(base, geometry)
    red = red_identity(base, [site.name for site in geometry.sites])
    assert {k: v for k, v in red.items() if k not in ("width", "sites")} == {
        k: v for k, v in lofit.items() if k not in ("num_heads", "head_dim")
    }
    assert red["width"] == base.config.hidden_size and lofit["head_dim"] == geometry.head_dim


def test_a_red_file_stores_the_fingerprint_packed_and_a_format_1_file_is_still_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    from lofit.adapters.fingerprint_store import CODES_KEY, SUM_SQ_KEY
    from lofit.adapters.persistence import write_adapter_files
    from lofit.baselines.red import WEIGHTS_NAME

    model = get_red_model(tiny_model("llama"), layers=[1])
    model.save_pretrained(tmp_path / "new")
    tensors = load_file(str(tmp_path / "new" / WEIGHTS_NAME))
    assert {CODES_KEY, SUM_SQ_KEY} <= set(tensors)
    document = json.loads((tmp_path / "new" / CONFIG_NAME).read_text())
    assert document["format_version"] == 2 and "encoding" in document["base_model"]["weights_fingerprint"]
    # format 1: the identity as JSON digests, no fingerprint tensors
    document["format_version"] = 1
    document["base_model"] = red_identity(model.get_base_model(), model.site_names)
    vectors = {k: v for k, v in tensors.items() if k.startswith("layers.")}
    write_adapter_files(tmp_path / "old", document, vectors, CONFIG_NAME, WEIGHTS_NAME)
    RedModel.from_pretrained(tiny_model("llama").to(torch.bfloat16), tmp_path / "old")
    with pytest.raises(BaseModelMismatchError, match="differ"):
        RedModel.from_pretrained(tiny_model("llama", seed=1), tmp_path / "old")
