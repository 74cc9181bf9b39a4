"""Head-level adapters on every supported architecture, checked against a hand-written oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from lofit import LofitConfig, LofitModel, get_lofit_model
from lofit.adapters.config import LofitConfigError
from lofit.adapters.heads import UnsupportedArchitectureError
from lofit.adapters.layer import LofitProjection
from tiny_models import ARCHITECTURES, VOCAB, head_dim_of, oracle_logits, tiny_model

SEED = 0
LAST = 2  # tiny models have 3 layers
HEADS = {0: [0, 2], LAST: [1, 3]}


def input_ids(batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize(model: LofitModel, adapter_name: str | None = None, seed: int = 2) -> None:
    """Give every head of the adapter a clearly non-trivial scale and offset."""
    generator = torch.Generator().manual_seed(seed)
    config = model.lofit_config[adapter_name or model.active_adapter]
    kinds = [k for k, used in (("scale", config.use_scale), ("offset", config.use_offset)) if used]
    params = model.get_head_params(adapter_name)
    for entry in params.values():
        for kind in kinds:
            entry[kind] = 0.5 * torch.randn(entry[kind].shape, generator=generator)
    model.set_head_params(params, adapter_name)


def adapted(arch: str, heads: dict[int, list[int]] | None = None, **config: object) -> LofitModel:
    config = {"use_scale": True, "use_offset": True, **config}
    model = get_lofit_model(tiny_model(arch, SEED), LofitConfig(heads=heads or HEADS, **config))  # type: ignore[arg-type]
    randomize(model)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------ per architecture
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_zero_init_is_bitwise_identity(arch: str) -> None:
    ids = input_ids()
    expected = logits(tiny_model(arch, SEED), ids)
    for use_scale in (False, True):
        model = get_lofit_model(tiny_model(arch, SEED), LofitConfig(init_std=0.0, use_scale=use_scale))
        assert torch.equal(logits(model, ids), expected)


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "gemma3_text"])  # + Gemma 3 (the bundled gemma3-270m)
def test_matches_hand_written_oracle(arch: str) -> None:
    ids = input_ids()
    model = adapted(arch)
    params = model.get_head_params()
    assert sorted(params) == [(0, 0), (0, 2), (LAST, 1), (LAST, 3)]
    assert all(p["scale"].shape == (head_dim_of(arch),) for p in params.values())
    got = logits(model, ids)
    assert max_diff(got, oracle_logits(arch, SEED, params, ids)) <= 1e-5
    # The edit must matter, or the comparison above proves nothing.
    assert max_diff(got, logits(tiny_model(arch, SEED), ids)) > 1e-2
    # Offsets only (scale reported as zeros).
    offsets = adapted(arch, use_scale=False)
    params = offsets.get_head_params()
    assert all(torch.equal(p["scale"], torch.zeros(head_dim_of(arch))) for p in params.values())
    assert max_diff(logits(offsets, ids), oracle_logits(arch, SEED, params, ids)) <= 1e-5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_only_adapter_params_train_and_other_heads_untouched(arch: str) -> None:
    model = adapted(arch)
    model.train()
    adapter_params = model.adapter_parameters()
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in adapter_params}
    assert model.count_parameters()[0] == 2 * 4 * head_dim_of(arch)

    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(layer: int, where: int):  # type: ignore[no-untyped-def]
        def hook(module, args):  # type: ignore[no-untyped-def]
            pair = seen.get(layer, (None, None))
            seen[layer] = (args[0].detach(), pair[1]) if where == 0 else (pair[0], args[0].detach())

        return hook

    for projection in model.projections():
        projection.register_forward_pre_hook(capture(projection.layer_index, 0))  # before the edit
        projection.base_layer.register_forward_pre_hook(capture(projection.layer_index, 1))  # after
    out = model(input_ids=input_ids(), labels=input_ids())
    out.loss.backward()

    for name, param in model.get_base_model().named_parameters():
        if all(param is not p for p in adapter_params):
            assert param.grad is None, name
    for param in adapter_params:
        assert param.grad is not None and param.grad.dtype == torch.float32
        assert (param.grad.abs().sum(dim=1) > 0).all()  # every selected head gets a gradient

    d = head_dim_of(arch)
    for layer in range(3):
        before, after = seen[layer]
        for head in range(4):
            cols = slice(head * d, (head + 1) * d)
            if head in HEADS.get(layer, []):
                assert not torch.equal(before[..., cols], after[..., cols])
            else:
                assert torch.equal(before[..., cols], after[..., cols]), (layer, head)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_merge_and_unload_matches_unmerged(arch: str) -> None:
    ids = input_ids()
    model = adapted(arch)
    unmerged = logits(model, ids)
    base_class = type(model.get_base_model())
    merged = model.merge_and_unload()
    # Offsets need an o_proj bias, which these classes cannot hold: the merge returns the equivalent Llama.
    assert type(merged) is (LlamaForCausalLM if arch in ("mistral", "qwen2", "phi3") else base_class)
    assert not any(isinstance(m, LofitProjection) for m in merged.modules())
    assert max_diff(logits(merged, ids), unmerged) <= 1e-5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_and_several_adapters(arch: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ids = input_ids()
    base_logits = logits(tiny_model(arch, SEED), ids)
    model = adapted(arch)
    first = logits(model, ids)
    model.save_pretrained(tmp_path / "a")

    model.load_adapter(tmp_path / "a", adapter_name="copy")
    assert model.active_adapter == "copy"
    assert torch.equal(logits(model, ids), first)

    fresh = LofitModel.from_pretrained(tiny_model(arch, SEED), tmp_path / "a", adapter_name="other")
    assert fresh.adapter_names == ["other"]
    assert torch.equal(logits(fresh, ids), first)
    assert not any(p.requires_grad for p in fresh.parameters())
    trainable = LofitModel.from_pretrained(tiny_model(arch, SEED), tmp_path / "a", is_trainable=True)
    assert {id(p) for p in trainable.parameters() if p.requires_grad} == {
        id(p) for p in trainable.adapter_parameters()
    }

    model.add_adapter("second", LofitConfig(heads={1: [1]}, use_scale=True))
    randomize(model, "second", seed=5)
    assert model.active_adapter == "copy"  # adding does not activate
    model.set_adapter("second")
    second = logits(model, ids)
    assert max_diff(second, oracle_logits(arch, SEED, model.get_head_params(), ids)) <= 1e-5
    model.set_adapter("default")
    assert torch.equal(logits(model, ids), first)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), base_logits)
    assert torch.equal(logits(model, ids), first)

    model.delete_adapter("default")
    assert model.active_adapter == "copy" and model.adapter_names == ["copy", "second"]
    assert torch.equal(logits(model, ids), first)
    with pytest.raises(KeyError, match="default"):
        model.set_adapter("default")
    model.delete_adapter("copy")
    model.delete_adapter("second")
    assert torch.equal(logits(model, ids), base_logits)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generate_with_kv_cache_matches_merged(arch: str) -> None:
    prompt = input_ids(batch=1, length=5)
    kwargs = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "use_cache": True}
    model = adapted(arch)
    with torch.no_grad():
        unmerged = model.generate(input_ids=prompt, **kwargs)
        no_cache = model.generate(input_ids=prompt, **{**kwargs, "use_cache": False})
        merged = model.merge_and_unload().generate(input_ids=prompt, **kwargs)
    assert unmerged.shape == (1, 15)
    assert torch.equal(unmerged, no_cache)
    assert torch.equal(unmerged, merged)


# ------------------------------------------------------------------------------------ the rest
def test_head_params_round_trip() -> None:
    model = adapted("llama")
    params = model.get_head_params()
    other = get_lofit_model(tiny_model("llama", SEED), LofitConfig(heads=HEADS, use_scale=True))
    other.set_head_params(params)
    again = other.get_head_params()
    assert params.keys() == again.keys()
    for key in params:
        for kind in ("scale", "offset"):
            assert torch.equal(params[key][kind], again[key][kind])
    ids = input_ids()
    assert torch.equal(logits(other, ids), logits(model, ids))
    with pytest.raises(KeyError, match=r"\(1, 0\)"):
        other.set_head_params({(1, 0): params[(0, 0)]})
    with pytest.raises(ValueError, match="shape"):
        other.set_head_params({(0, 0): {"offset": torch.zeros(3)}})
    offsets_only = get_lofit_model(tiny_model("llama", SEED), LofitConfig(heads=HEADS))
    offsets_only.set_head_params({(0, 0): {"scale": torch.zeros(8), "offset": torch.ones(8)}})
    with pytest.raises(ValueError, match="does not learn a scale"):
        offsets_only.set_head_params({(0, 0): {"scale": torch.ones(8)}})


def test_print_trainable_parameters(capsys) -> None:  # type: ignore[no-untyped-def]
    model = get_lofit_model(tiny_model("llama", SEED), LofitConfig(heads={0: [1]}))
    model.print_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    assert capsys.readouterr().out.strip() == (
        f"trainable params: 8 || all params: {total:,d} || trainable%: {100 * 8 / total:.4f}"
    )


@pytest.mark.parametrize(
    ("heads", "message"),
    [({3: [0]}, "layer 3 is out of range"), ({1: [0, 4]}, r"head indices \[4\] are out of range")],
)
def test_out_of_range_heads(heads: dict[int, list[int]], message: str) -> None:
    base = tiny_model("llama", SEED)
    with pytest.raises(LofitConfigError, match=message):
        get_lofit_model(base, LofitConfig(heads=heads))
    with pytest.raises(LofitConfigError, match="negative"):
        LofitConfig(heads={0: [-1]})


class TinyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.ModuleDict({"out_proj": nn.Linear(8, 8)})


class TinyCustomModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TinyBlock(), TinyBlock()])


def test_unknown_architecture_needs_target_modules() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="target_modules"):
        get_lofit_model(TinyCustomModel(), LofitConfig())
    from transformers import AutoModelForCausalLM, GPTNeoConfig

    neo = AutoModelForCausalLM.from_config(
        GPTNeoConfig(
            vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global"], 2]]
        )
    )
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type 'gpt_neo'.*target_modules"):
        get_lofit_model(neo, LofitConfig())


def test_target_modules_override() -> None:
    from transformers import AutoModelForCausalLM, GPTNeoConfig

    config = GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, attention_types=[[["global"], 3]]
    )
    torch.manual_seed(SEED)
    neo = AutoModelForCausalLM.from_config(config).eval()
    reference = AutoModelForCausalLM.from_config(config).eval()
    reference.load_state_dict(neo.state_dict())
    model = get_lofit_model(
        neo, LofitConfig(heads=HEADS, use_scale=True, target_modules=["attn.attention.out_proj"])
    )
    randomize(model)
    assert model.geometry.model_type == "gpt_neo" and model.geometry.num_layers == 3
    ids = input_ids()
    params = model.get_head_params()
    suffix = "attn.attention.out_proj"
    projections = [m for name, m in reference.named_modules() if name.endswith(suffix)]
    for layer, projection in enumerate(projections):

        def hook(module, args, layer=layer):  # type: ignore[no-untyped-def]
            z = args[0].clone()
            for (lay, head), entry in params.items():
                if lay == layer:
                    z[..., head * 8 : head * 8 + 8] = (1 + entry["scale"]) * z[
                        ..., head * 8 : head * 8 + 8
                    ] + entry["offset"]
            return (z,)

        projection.register_forward_pre_hook(hook)
    assert max_diff(logits(model, ids), logits(reference, ids)) <= 1e-5
    # Overriding on a known architecture: a module whose input is not the heads is refused.
    with pytest.raises(UnsupportedArchitectureError, match="input features"):
        get_lofit_model(tiny_model("llama", SEED), LofitConfig(target_modules=["mlp.down_proj"]))
    with pytest.raises(UnsupportedArchitectureError, match="no module"):
        get_lofit_model(tiny_model("llama", SEED), LofitConfig(target_modules=["nothing.here"]))


def _adapter_grads(model: LofitModel) -> list[torch.Tensor | None]:
    model.train()
    model(input_ids=input_ids(), labels=input_ids()).loss.backward()
    return [p.grad for p in model.adapter_parameters()]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_same_gradients(reentrant: bool) -> None:
    reference = _adapter_grads(adapted("llama"))
    kwargs = {"use_reentrant": reentrant}

    on_wrapper = adapted("llama")
    on_wrapper.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    on_base = adapted("llama")
    on_base.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for model in (on_wrapper, on_base):
        assert model.get_base_model().is_gradient_checkpointing
        grads = _adapter_grads(model)
        for got, expected in zip(grads, reference, strict=True):
            assert got is not None
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)

    if reentrant:
        # What transformers < 5 does (no input-grad hook): the frozen base blocks the gradient...
        old_style = adapted("llama")
        old_style.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        old_style.get_base_model().disable_input_require_grads()
        with pytest.raises(RuntimeError, match="does not require grad"):
            _adapter_grads(old_style)
        # ... and LofitModel.gradient_checkpointing_enable restores it.
        old_style.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        for got, expected in zip(_adapter_grads(old_style), reference, strict=True):
            assert got is not None
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_bf16_base_keeps_fp32_vectors() -> None:
    base = tiny_model("llama", SEED).to(torch.bfloat16)
    model = get_lofit_model(base, LofitConfig(heads=HEADS, use_scale=True, init_std=0.1))
    before = [p.detach().clone() for p in model.adapter_parameters()]
    assert all(p.dtype == torch.float32 for p in before)
    model.to(torch.bfloat16)
    model.half()
    model.to(torch.bfloat16)
    after = model.adapter_parameters()
    assert all(p.dtype == torch.float32 and p.requires_grad for p in after)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert model.get_base_model().model.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16
    out = model(input_ids=input_ids(), labels=input_ids())
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in after)
    # A scale of 3e-3 survives in bf16 (1 + 3e-3 would round to 1 in bf16).
    base = tiny_model("llama", SEED).to(torch.bfloat16)
    tiny = get_lofit_model(base, LofitConfig(heads={0: [0]}, use_scale=True, use_offset=False, init_std=0.0))
    ids = input_ids()
    reference = logits(tiny, ids)
    tiny.set_head_params({(0, 0): {"scale": torch.full((8,), 3e-3), "offset": torch.zeros(8)}})
    assert not torch.equal(logits(tiny, ids), reference)
