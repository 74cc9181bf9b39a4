"""RepE baseline: residual capture, reading/contrast vectors and the shifted model, against oracles."""

from __future__ import annotations

import pytest
import torch

from lofit.baselines.repe import (
    RepeError,
    RepeShift,
    apply_repe,
    contrast_vector,
    reading_vector,
    residual_at_last_token,
    residual_scale,
)
from lofit.errors import LofitError
from tiny_models import tiny_model, tiny_tokenizer

TEXTS = ["Q: who? A: me", "Q: where? A: here and there", "abc"]


def last_layer_output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Pre-norm output of the last decoder layer, read by a plain capture hook (no edit)."""
    seen: list[torch.Tensor] = []
    handle = model.model.layers[-1].register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach())
    )
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen[0]


def test_residuals_match_hidden_states_and_ignore_padding() -> None:
    model, tok = tiny_model("llama", 0), tiny_tokenizer()
    acts = residual_at_last_token(model, tok, TEXTS, batch_size=2)  # the last batch pads differently
    assert acts.shape == (3, model.config.num_hidden_layers, model.config.hidden_size)
    for row, text in enumerate(TEXTS):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
        # hidden_states[l + 1] is layer l's output, except the last one, which has the final norm applied.
        for layer in range(model.config.num_hidden_layers - 1):
            torch.testing.assert_close(acts[row, layer], states[layer + 1][0, -1], rtol=1e-5, atol=1e-5)
        normed = model.model.norm(acts[row, -1][None, None])[0, 0]
        torch.testing.assert_close(normed, states[-1][0, -1], rtol=1e-5, atol=1e-5)
    alone = residual_at_last_token(model, tok, TEXTS[2:], batch_size=1)
    torch.testing.assert_close(alone[0], acts[2], rtol=1e-5, atol=1e-5)


def test_reading_vector_is_top_eigenvector_of_difference_moment() -> None:
    generator = torch.Generator().manual_seed(0)
    negative = torch.randn(20, 3, 6, generator=generator)
    spread = torch.randn(20, 1, 1, generator=generator) * torch.tensor([3.0, 0.5, 0, 0, 0, 0])
    positive = negative + spread + 0.4 + 0.05 * torch.randn(20, 3, 6, generator=generator)
    directions = reading_vector(positive, negative)
    for layer in range(3):
        d = (positive - negative)[:, layer].double()
        _, vectors = torch.linalg.eigh(d.T @ d)  # independent: eigen-decomposition of Dᵀ D
        top = vectors[:, -1].float()
        assert abs(float(directions[layer] @ top)) == pytest.approx(1.0, abs=1e-5)
        assert float(d.mean(0).float() @ directions[layer]) > 0  # true minus false projects positively
    assert torch.allclose(directions.norm(dim=-1), torch.ones(3))


def test_contrast_vector_and_scale_by_hand() -> None:
    positive = torch.tensor([[[2.0, 0.0]], [[4.0, 2.0]]])
    negative = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]], [[0.0, 2.0]]])
    # mean(pos) = (3, 1), mean(neg) = (0, 2/3) -> (3, 1/3) normalised
    expected = torch.tensor([3.0, 1 / 3]) / (9 + 1 / 9) ** 0.5
    torch.testing.assert_close(contrast_vector(positive, negative)[0], expected)
    assert residual_scale(positive).item() == pytest.approx((2 + 20**0.5) / 2 / 2**0.5, rel=1e-6)


def test_shift_on_last_layer_matches_manual_logits_and_disable_is_exact() -> None:
    model, tok = tiny_model("llama", 1), tiny_tokenizer()
    ids = torch.tensor([tok("Q: who is it? A:")["input_ids"]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    hidden = last_layer_output(model, ids)
    direction = torch.nn.functional.normalize(torch.randn(model.config.hidden_size), dim=0)
    shift = RepeShift(model.config.num_hidden_layers - 1, direction, alpha=5.0, scale=0.7)
    wrapped = apply_repe(model, shift)
    with torch.no_grad():
        expected = model.lm_head(model.model.norm(hidden + 3.5 * direction))  # oracle: edit by hand
        torch.testing.assert_close(wrapped(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        with wrapped.disable_adapter():
            assert torch.equal(wrapped(input_ids=ids).logits, plain)
    assert sum(p.requires_grad for p in wrapped.parameters()) == sum(
        p.requires_grad for p in model.parameters()
    )
    wrapped.unload()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain)


def test_shift_applies_at_every_generation_step() -> None:
    model, tok = tiny_model("llama", 2), tiny_tokenizer()
    direction = torch.nn.functional.normalize(torch.randn(model.config.hidden_size), dim=0)
    wrapped = apply_repe(model, RepeShift(0, direction, alpha=15.0, scale=1.0))
    ids = torch.tensor([tok("Q: x A:")["input_ids"]])
    with torch.no_grad():
        generated = wrapped.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=1)
        manual = ids
        for _ in range(6):  # greedy without a cache: every step re-runs the shifted model on all tokens
            step = wrapped(input_ids=manual, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            manual = torch.cat([manual, step], dim=1)
    assert torch.equal(generated, manual)


def test_bad_inputs_raise_lofit_errors() -> None:
    model = tiny_model("llama", 0)
    width = model.config.hidden_size
    with pytest.raises(RepeError, match="out of range"):
        apply_repe(model, RepeShift(99, torch.zeros(width), 1.0, 1.0))
    with pytest.raises(RepeError, match="shape"):
        apply_repe(model, RepeShift(0, torch.zeros(width + 1), 1.0, 1.0))
    with pytest.raises(LofitError, match="coincide"):
        contrast_vector(torch.ones(2, 1, 3), torch.ones(2, 1, 3))
    with pytest.raises(RepeError, match="pairs"):
        reading_vector(torch.ones(2, 1, 3), torch.ones(3, 1, 3))
    with pytest.raises(RepeError, match="empty"):
        residual_at_last_token(model, tiny_tokenizer(), [])
