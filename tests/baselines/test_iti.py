"""ITI: mass-mean directions and σ checked by hand, offsets through LoFiT checked against a raw hook."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lofit.adapters.heads import find_output_projections
from lofit.baselines import (
    apply_iti,
    head_activations_at_last_token,
    iti_offsets,
    iti_records,
    mass_mean_directions,
    trainable_parameters,
)
from tiny_models import tiny_model, tiny_tokenizer

IDS = torch.tensor([[5, 17, 33, 40, 2, 90, 61, 7], [12, 3, 3, 100, 45, 9, 27, 88]])


# ----------------------------------------------------------------------------- directions and σ
def test_directions_and_sigma_by_hand() -> None:
    # 4 examples, 1 layer, 2 heads, head_dim 2. Head 0: true (1,0),(3,0); false (0,0),(0,2).
    # Head 1: both classes average (1,1), so no direction.
    head0 = [[1.0, 0.0], [3.0, 0.0], [0.0, 0.0], [0.0, 2.0]]
    head1 = [[1.0, 1.0], [1.0, 1.0], [2.0, 0.0], [0.0, 2.0]]
    acts = torch.tensor([[h0, h1] for h0, h1 in zip(head0, head1, strict=True)]).unsqueeze(1)  # [4,1,2,2]
    result = mass_mean_directions(acts, torch.tensor([1, 1, 0, 0]))
    # mean true (2,0) - mean false (0,1) = (2,-1); u = (2,-1)/sqrt(5)
    expected_u = torch.tensor([2.0, -1.0]) / math.sqrt(5)
    assert torch.allclose(result.directions[0, 0], expected_u, atol=1e-7)
    # projections * sqrt(5): 2, 6, 0, -2; mean 1.5; squared deviations sum 35; ddof 0 -> 35/4/5
    assert result.sigmas[0, 0].item() == pytest.approx(math.sqrt(35 / 4 / 5), abs=1e-6)
    assert torch.equal(result.directions[0, 1], torch.zeros(2))
    assert result.sigmas[0, 1].item() == 0.0
    unbiased = mass_mean_directions(acts, [1, 1, 0, 0], unbiased=True)
    assert unbiased.sigmas[0, 0].item() == pytest.approx(math.sqrt(35 / 3 / 5), abs=1e-6)
    # σ over another bank (no labels): head 0 projections of (5,0),(0,5) are 10/√5, -5/√5
    bank = torch.zeros(2, 1, 2, 2)
    bank[0, 0, 0] = torch.tensor([5.0, 0.0])
    bank[1, 0, 0] = torch.tensor([0.0, 5.0])
    banked = mass_mean_directions(acts, [1, 1, 0, 0], std_acts=bank)
    assert banked.sigmas[0, 0].item() == pytest.approx(7.5 / math.sqrt(5), abs=1e-6)
    assert torch.equal(banked.directions, result.directions)


def test_directions_match_per_head_numpy_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    acts = torch.randn(20, 3, 4, 5, generator=generator)
    labels = torch.tensor([1, 0] * 10)
    result = mass_mean_directions(acts, labels)
    data = acts.numpy().astype(np.float64)
    for layer in range(3):
        for head in range(4):
            x = data[:, layer, head]
            difference = x[labels.numpy() == 1].mean(0) - x[labels.numpy() == 0].mean(0)
            u = difference / np.linalg.norm(difference)
            sigma = np.std(x @ u)
            assert np.allclose(result.directions[layer, head].numpy(), u, atol=1e-6)
            assert result.sigmas[layer, head].item() == pytest.approx(sigma, rel=1e-5)
    assert result.directions.dtype == torch.float32 and result.directions.shape == (3, 4, 5)


def test_direction_input_errors() -> None:
    acts = torch.randn(4, 1, 2, 3)
    with pytest.raises(ValueError, match="both labels"):
        mass_mean_directions(acts, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="4 examples"):
        mass_mean_directions(acts, [1, 0])
    with pytest.raises(ValueError, match=r"0 .* or 1"):
        mass_mean_directions(acts, [1, 0, 2, 0])
    with pytest.raises(ValueError, match=r"\[N, layers, heads, head_dim\]"):
        mass_mean_directions(acts[0], [1, 0])
    with pytest.raises(ValueError, match="std_acts"):
        mass_mean_directions(acts, [1, 0, 1, 0], std_acts=torch.randn(4, 1, 3, 3))


def test_iti_offsets_are_alpha_sigma_u() -> None:
    directions = torch.randn(3, 4, 5)
    sigmas = torch.rand(3, 4)
    offsets = iti_offsets(directions, sigmas, {2: [1, 3], 0: [0]}, alpha=15.0)
    assert sorted(offsets) == [(0, 0), (2, 1), (2, 3)]
    for (layer, head), shift in offsets.items():
        assert torch.allclose(shift, 15.0 * sigmas[layer, head] * directions[layer, head], atol=1e-6)
    as_pairs = iti_offsets(directions, sigmas, [(2, 3), (0, 0), (2, 1)], alpha=15.0)
    assert all(torch.equal(as_pairs[key], offsets[key]) for key in offsets)
    with pytest.raises(ValueError, match="out of range"):
        iti_offsets(directions, sigmas, [(3, 0)], alpha=1.0)
    with pytest.raises(ValueError, match="no head"):
        iti_offsets(directions, sigmas, {}, alpha=1.0)


# ------------------------------------------------------------------------------ applying ITI
def _oracle_model(model_type: str, offsets: dict[tuple[int, int], torch.Tensor]) -> torch.nn.Module:
    """A fresh base model with hand-written pre-hooks adding each offset to its head's input slice."""
    model = tiny_model(model_type)
    geometry = find_output_projections(model)
    for site in geometry.sites:
        shifts = {head: v for (layer, head), v in offsets.items() if layer == site.layer}
        if not shifts:
            continue

        def add(_module, args, shifts=shifts):  # type: ignore[no-untyped-def]
            x = args[0].clone()
            for head, v in shifts.items():
                x[..., head * geometry.head_dim : (head + 1) * geometry.head_dim] += v
            return (x, *args[1:])

        model.get_submodule(site.name).register_forward_pre_hook(add)
    return model


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_apply_iti_matches_raw_hook_oracle(model_type: str) -> None:
    geometry = find_output_projections(tiny_model(model_type))
    generator = torch.Generator().manual_seed(1)
    directions = torch.randn(geometry.num_layers, geometry.num_heads, geometry.head_dim, generator=generator)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    sigmas = torch.rand(geometry.num_layers, geometry.num_heads, generator=generator) + 0.5
    offsets = iti_offsets(directions, sigmas, {0: [1], 2: [0, 3]}, alpha=4.0)
    model = apply_iti(tiny_model(model_type), offsets)
    oracle = _oracle_model(model_type, offsets)
    with torch.no_grad():
        got = model(input_ids=IDS).logits
        want = oracle(input_ids=IDS).logits
        base = tiny_model(model_type)(input_ids=IDS).logits
    assert (got - want).abs().max().item() < 1e-5
    assert (got - base).abs().max().item() > 1e-2  # the shift does something
    assert trainable_parameters(model) == []
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, base)
    if model_type == "llama":  # generation shifts every new position too
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(IDS[:1], **kwargs), oracle.generate(IDS[:1], **kwargs))


def test_apply_iti_on_lofit_model_replaces_the_adapter() -> None:
    first = {(1, 2): torch.full((8,), 0.5)}
    second = {(0, 0): torch.linspace(-1, 1, 8), (2, 3): torch.ones(8)}
    model = apply_iti(tiny_model("llama"), first)
    again = apply_iti(model, second)
    assert again is model and model.selected_heads("iti") == {0: [0], 2: [3]}
    with torch.no_grad():
        got = model(input_ids=IDS).logits
        want = _oracle_model("llama", second)(input_ids=IDS).logits
    assert (got - want).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------- activations
def _raw_last_token_acts(model_type: str, text: str) -> torch.Tensor:
    """Oracle: one unpadded text, a hook on each o_proj input, last position, reshaped [L, H, d]."""
    model = tiny_model(model_type)
    tokenizer = tiny_tokenizer()
    geometry = find_output_projections(model)
    seen: list[torch.Tensor] = []
    for site in geometry.sites:
        model.get_submodule(site.name).register_forward_pre_hook(lambda _m, a: seen.append(a[0][0, -1]))
    with torch.no_grad():
        model(input_ids=tokenizer(text, return_tensors="pt")["input_ids"])
    return torch.stack(seen).reshape(geometry.num_layers, geometry.num_heads, geometry.head_dim)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_head_activations_batched_equal_unpadded(model_type: str) -> None:
    texts = ["Q: Can pigs fly? A: No.", "Hi", "A medium length text here"]
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"  # must be overridden: left padding would move the last token
    acts = head_activations_at_last_token(tiny_model(model_type), tokenizer, texts, batch_size=2)
    assert acts.shape == (3, 3, 4, 8) and acts.dtype == torch.float32
    for index, text in enumerate(texts):
        assert (acts[index] - _raw_last_token_acts(model_type, text)).abs().max().item() < 1e-5


def test_activations_see_the_iti_shift_in_layer_zero() -> None:
    tokenizer = tiny_tokenizer()
    texts = ["one text", "another, longer text"]
    before = head_activations_at_last_token(tiny_model("llama"), tokenizer, texts)
    shift = torch.linspace(-2, 2, 8)
    model = apply_iti(tiny_model("llama"), {(0, 1): shift})
    after = head_activations_at_last_token(model, tokenizer, texts)
    assert torch.allclose(after[:, 0, 1] - before[:, 0, 1], shift.expand(2, 8), atol=1e-5)
    assert torch.allclose(after[:, 0, 0], before[:, 0, 0], atol=1e-6)


def test_end_to_end_directions_from_model_activations() -> None:
    tokenizer = tiny_tokenizer()
    records = [
        {"question": "Is the sky blue?", "best_answer": "Yes.", "correct_answers": ["Yes.", "It is."],
         "incorrect_answers": ["No."]},
        {"question": "Can pigs fly?", "best_answer": "No.", "correct_answers": ["No."],
         "incorrect_answers": ["Yes.", "They can."]},
    ]  # fmt: skip
    pairs = iti_records(records, "truthfulqa_mc")
    texts, labels = zip(*pairs, strict=True)
    acts = head_activations_at_last_token(tiny_model("llama"), tokenizer, list(texts), batch_size=4)
    result = mass_mean_directions(acts, list(labels))
    assert torch.allclose(result.directions.norm(dim=-1), torch.ones(3, 4), atol=1e-5)
    assert (result.sigmas > 0).all()


# ----------------------------------------------------------------------------------- records
def test_iti_records() -> None:
    dpo = [{"prompt": "Q: Can pigs fly? A:", "chosen": "No", "rejected": "Yes"}]
    assert iti_records(dpo, "dpo") == [("Q: Can pigs fly? A:No", 1), ("Q: Can pigs fly? A:Yes", 0)]
    tqa = [
        {"question": "Can pigs fly?", "best_answer": "No.", "correct_answers": ["No.", "Pigs cannot fly."],
         "incorrect_answers": ["Yes."]},
    ]  # fmt: skip
    assert iti_records(tqa, "truthfulqa_mc") == [
        ("Q: Can pigs fly? A: No.", 1),
        ("Q: Can pigs fly? A: Pigs cannot fly.", 1),
        ("Q: Can pigs fly? A: Yes.", 0),
    ]
    with pytest.raises(ValueError, match="'sft' records have no negative"):
        iti_records([{"prompt": "a", "completion": "b"}], "sft")
