"""The one activation recorder: any modules' inputs or outputs at chosen positions, and who uses it."""

from __future__ import annotations

import pytest
import torch

import lofit.baselines.repe as repe
import lofit.selection.activations as activations
from lofit.errors import LofitValueError
from lofit.selection.activations import record_activations, right_padded
from tiny_models import tiny_model, tiny_tokenizer


def test_recorded_layer_outputs_at_chosen_positions_match_hidden_states() -> None:
    model = tiny_model("llama", 0)
    sequences = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    positions = [2, 0, 2]
    acts = record_activations(model, model.model.layers, sequences, positions, read="output", batch_size=2)
    assert acts.shape == (3, model.config.num_hidden_layers, model.config.hidden_size)
    for row, (ids, position) in enumerate(zip(sequences, positions, strict=True)):
        with torch.no_grad():
            states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        for layer in range(model.config.num_hidden_layers - 1):  # the last one has the final norm applied
            torch.testing.assert_close(acts[row, layer], states[layer + 1][0, position], rtol=1e-5, atol=1e-5)


def test_recorded_inputs_are_what_the_module_receives() -> None:
    model = tiny_model("llama", 1)
    projection = model.model.layers[1].self_attn.o_proj
    seen: list[torch.Tensor] = []
    handle = projection.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 4, 5, 6]]))
    finally:
        handle.remove()
    acts = record_activations(model, [projection], [[3, 4, 5, 6]], [1])
    torch.testing.assert_close(acts[0, 0], seen[0][0, 1])


def test_bad_positions_and_batch_sizes_are_refused() -> None:
    model = tiny_model("llama", 0)
    with pytest.raises(LofitValueError, match="position 4 is outside its 2 tokens"):
        record_activations(model, model.model.layers, [[1, 2]], [4])
    with pytest.raises(LofitValueError, match="batch_size must be >= 1"):
        record_activations(model, model.model.layers, [[1, 2]], batch_size=0)


def test_right_padding() -> None:
    ids, mask = right_padded([[5, 6, 7], [8]], pad_token_id=1)
    assert ids.tolist() == [[5, 6, 7], [8, 1, 1]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_repe_and_head_activations_record_through_the_one_recorder(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = activations.record_activations

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs.get("read", "input"))
        return real(*args, **kwargs)

    monkeypatch.setattr(activations, "record_activations", spy)
    monkeypatch.setattr(repe, "record_activations", spy)
    model, tokenizer = tiny_model("llama", 0), tiny_tokenizer()
    repe.residual_at_last_token(model, tokenizer, ["abc"])
    activations.text_head_activations(model, tokenizer, ["abc"])  # probes and ITI read heads here
    assert calls == ["output", "input"]
