"""`lofit.combine_adapters`: union of heads, weighted sum of offsets, product of (1 + w A)."""

from __future__ import annotations

import pytest
import torch

import lofit
from lofit import LofitConfig, get_lofit_model
from lofit.errors import LofitValueError
from tiny_models import OUTPUT_PROJECTION, head_dim_of, oracle_logits, tiny_model

IDS = torch.tensor([[5, 17, 9, 44, 3, 8], [60, 2, 71, 30, 11, 12]])


def _model(use_scale: bool = False, model_type: str = "llama"):  # type: ignore[no-untyped-def]
    model = get_lofit_model(tiny_model(model_type), LofitConfig(heads={0: [1], 2: [0, 3]}, init_std=0.5), "a")
    model.add_adapter("b", LofitConfig(heads={1: [2], 2: [3]}, use_scale=use_scale, init_std=0.5))
    return model.eval()


def _weighted_edit(model, names, weights):  # type: ignore[no-untyped-def]
    """By hand, head by head: the offset sum_i w_i v_i and the factor prod_i (1 + w_i A_i)."""
    d = model.geometry.head_dim
    edit: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for name, weight in zip(names, weights, strict=True):
        for key, entry in model.get_head_params(name).items():
            acc = edit.setdefault(key, {"offset": torch.zeros(d), "factor": torch.ones(d)})
            acc["offset"] = acc["offset"] + weight * entry["offset"]
            acc["factor"] = acc["factor"] * (1 + weight * entry["scale"])
    return {k: {"offset": e["offset"], "scale": e["factor"] - 1} for k, e in edit.items()}


@pytest.mark.parametrize("use_scale", [False, True])
@pytest.mark.parametrize("weights", [None, [0.5, -2.0]])
def test_combined_forward_equals_the_hand_computed_edit(use_scale: bool, weights: list[float] | None) -> None:
    model = _model(use_scale)
    lofit.combine_adapters(model, ["a", "b"], weights=weights, new_name="ab")
    assert model.selected_heads("ab") == {0: [1], 1: [2], 2: [0, 3]}
    assert model.active_adapter == "a" and not any(p.requires_grad for p in model.adapter_parameters("ab"))
    model.set_adapter("ab")
    expected = oracle_logits("llama", 0, _weighted_edit(model, ["a", "b"], weights or [1, 1]), IDS)
    assert torch.allclose(model(input_ids=IDS).logits, expected, atol=1e-5)
    model.set_adapter("a")  # the test can fail: the shared head (2, 3) differs from a alone
    assert not torch.allclose(model(input_ids=IDS).logits, expected, atol=1e-3)


def test_disjoint_adapters_combined_act_as_both_applied_at_once() -> None:
    model = get_lofit_model(tiny_model("gpt2"), LofitConfig(heads={0: [1]}, init_std=0.5), "a")
    model.add_adapter("b", LofitConfig(heads={0: [2], 2: [0]}, use_scale=True, init_std=0.5))
    lofit.combine_adapters(model.eval(), ["a", "b"], new_name="ab")
    both = {**model.get_head_params("a"), **model.get_head_params("b")}  # disjoint: each head once
    model.set_adapter("ab")
    expected = oracle_logits("gpt2", 0, both, IDS, suffix=OUTPUT_PROJECTION["gpt2"])
    assert torch.allclose(model(input_ids=IDS).logits, expected, atol=1e-5)
    assert model.lofit_config["ab"].use_scale and model.lofit_config["ab"].use_offset
    assert head_dim_of("gpt2") == model.geometry.head_dim


def test_combined_adapter_saves_loads_and_serves_in_a_mixed_batch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _model(use_scale=True)
    lofit.combine_adapters(model, ["a", "b"], weights=[1.0, 0.25], new_name="ab")
    model.set_adapter("ab")
    logits = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "ab", adapter_name="ab")
    loaded = lofit.LofitModel.from_pretrained(tiny_model("llama"), tmp_path / "ab").eval()
    assert torch.allclose(loaded(input_ids=IDS).logits, logits, atol=1e-6)
    mixed = model(input_ids=IDS, adapter_names=["ab", "__base__"]).logits
    assert torch.allclose(mixed[0], logits[0], atol=1e-6)


def test_one_adapter_weighted_is_a_scaled_copy() -> None:
    model = _model()
    lofit.combine_adapters(model, ["a"], weights=[3.0], new_name="a3")
    for key, entry in model.get_head_params("a").items():
        assert torch.allclose(model.get_head_params("a3")[key]["offset"], 3.0 * entry["offset"])


@pytest.mark.parametrize(
    ("names", "weights", "new_name", "match"),
    [
        (["a", "zzz"], None, "n", "no adapter named 'zzz'"),
        (["a", "a"], None, "n", "lists an adapter twice"),
        ([], None, "n", "non-empty list"),
        ("a", None, "n", "non-empty list"),
        (["a", "b"], [1.0], "n", "one per name"),
        (["a", "b"], [1.0, float("nan")], "n", "finite"),
        (["a", "b"], [1.0, "2"], "n", "finite"),
        (["a", "b"], None, "a", "exists already"),
        (["a", "b"], None, "x.y", "without '.'"),
    ],
)
def test_bad_arguments_are_clear_errors(names, weights, new_name, match) -> None:  # type: ignore[no-untyped-def]
    model = _model()
    before = model.adapter_names
    with pytest.raises(LofitValueError, match=match):
        lofit.combine_adapters(model, names, weights=weights, new_name=new_name)
    assert model.adapter_names == before


def test_not_a_lofit_model() -> None:
    with pytest.raises(LofitValueError, match="needs a LofitModel"):
        lofit.combine_adapters(tiny_model("llama"), ["a"], new_name="n")  # type: ignore[arg-type]
