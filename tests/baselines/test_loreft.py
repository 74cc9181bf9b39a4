"""LoReFT baseline: Φ(h) = h + Rᵀ(Wh + b − Rh) with orthonormal R, its positions and its training."""

from __future__ import annotations

import pytest
import torch

from lofit.baselines.loreft import LoreftError, LoreftIntervention, get_loreft_model
from lofit.errors import LofitError
from tiny_models import tiny_model, tiny_tokenizer


def test_intervention_matches_formula_and_replaces_the_subspace() -> None:
    torch.manual_seed(0)
    phi = LoreftIntervention(16, 3)
    with torch.no_grad():
        phi.learned_source.bias.normal_()
    h = torch.randn(5, 16)
    r, w, b = phi.rotation.detach(), phi.learned_source.weight.detach(), phi.learned_source.bias.detach()
    expected = torch.stack([x + r.T @ (w @ x + b - r @ x) for x in h])  # the formula, one vector at a time
    out = phi(h).detach()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r @ r.T, torch.eye(3), rtol=0, atol=1e-5)
    # Independent reading: R h' = W h + b, and the orthogonal complement of R's rows is untouched.
    torch.testing.assert_close(out @ r.T, h @ w.T + b, rtol=1e-5, atol=1e-5)
    complement = torch.eye(16) - r.T @ r
    torch.testing.assert_close(out @ complement, h @ complement, rtol=1e-5, atol=1e-5)


def test_rotation_stays_orthonormal_after_optimizer_steps() -> None:
    torch.manual_seed(1)
    phi = LoreftIntervention(12, 4)
    optimizer = torch.optim.AdamW(phi.parameters(), lr=0.1)
    target = torch.randn(8, 12)
    for _ in range(5):
        optimizer.zero_grad()
        loss = (phi(torch.randn(8, 12)) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
    r = phi.rotation.detach()
    torch.testing.assert_close(r @ r.T, torch.eye(4), rtol=0, atol=1e-5)


def last_layer_output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
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


def test_model_edits_only_first_and_last_prompt_tokens() -> None:
    model, tok = tiny_model("llama", 0), tiny_tokenizer()
    prompt, response = "Q: who? A:", " me"
    ids = torch.tensor([tok(prompt + response)["input_ids"]])
    n_prompt = len(tok(prompt)["input_ids"])
    hidden = last_layer_output(model, ids)  # before wrapping: the plain model
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    wrapped = get_loreft_model(model, layers=[model.config.num_hidden_layers - 1], rank=2, first=2, last=1)
    phi = wrapped.interventions[0]
    with torch.no_grad():
        phi.learned_source.bias.normal_()
        edited = hidden.clone()
        for position in (0, 1, n_prompt - 1):
            edited[0, position] = phi(hidden[0, position])
        expected = model.lm_head(model.model.norm(edited))
        wrapped.register_prompts(tok, [prompt])  # the row is prompt + response: only prompt tokens edited
        torch.testing.assert_close(wrapped(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        with wrapped.prompt_lengths([n_prompt]):
            torch.testing.assert_close(wrapped(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        with wrapped.disable_adapter():
            assert torch.equal(wrapped(input_ids=ids).logits, plain)


def test_edit_mask_reads_padding_and_registered_prompts() -> None:
    model = tiny_model("llama", 0)
    wrapped = get_loreft_model(model, layers=[0], rank=1, first=1, last=2)
    ids = torch.tensor([[1, 1, 7, 8, 9, 10], [7, 8, 9, 10, 11, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    got = wrapped.edit_mask(ids, mask)  # no prompt known: each whole row is the prompt
    assert got.tolist() == [[False, False, True, False, True, True], [True, False, False, True, True, False]]
    wrapped._prompts = {3: {(7, 8, 9)}}  # a registered 3-token prompt
    got = wrapped.edit_mask(ids, mask)
    assert got.tolist() == [[False, False, True, True, True, False], [True, True, True, False, False, False]]
    # prompt + response tokenized its last prompt token differently (merged): the common prefix is the prompt
    wrapped._prompts, wrapped._heads = {4: {(7, 8, 99, 1)}}, {3: {(7, 8, 9)}}
    assert wrapped.edit_mask(ids[1:], mask[1:]).tolist() == [[True, True, True, False, False, False]]


def test_generation_edits_the_prompt_once_and_not_new_tokens() -> None:
    model, tok = tiny_model("llama", 3), tiny_tokenizer()
    wrapped = get_loreft_model(model, layers=[0, 1], rank=2, first=1, last=2)
    with torch.no_grad():
        for phi in wrapped.interventions:
            phi.learned_source.bias.normal_(std=3.0)
    ids = torch.tensor([tok("Q: x? A:")["input_ids"]])
    with torch.no_grad():
        generated = wrapped.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=1)
        manual = ids
        for _ in range(5):  # without a cache, re-running everything with the prompt boundary given
            with wrapped.prompt_lengths([ids.shape[1]]):
                step = wrapped(input_ids=manual, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            manual = torch.cat([manual, step], dim=1)
        with wrapped.disable_adapter():
            base = wrapped.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=1)
    assert torch.equal(generated, manual)
    assert not torch.equal(generated, base)  # the edit does change what is generated here


def test_trains_with_lofit_trainer_and_keeps_rotation_orthonormal() -> None:
    from lofit.baselines.parameters import trainable_parameters
    from lofit.training.loop import train_adapter
    from lofit.training.losses import make_objective
    from lofit.training.settings import TrainingConfig

    model, tok = tiny_model("llama", 0), tiny_tokenizer()
    wrapped = get_loreft_model(model, layers=[1], rank=2, first=1, last=1)
    records = [{"prompt": f"Q: {c}? A:", "completion": f" {c}{c}"} for c in "abcd"]
    wrapped.register_prompts(tok, [r["prompt"] for r in records])
    params = trainable_parameters(wrapped)
    assert {p.numel() for p in params} == {2 * 32, 2 * 32, 2}  # R (via its parametrization), W, b
    object.__setattr__(wrapped, "adapter_parameters", lambda *a, **k: params)
    config = TrainingConfig(epochs=8, batch_size=4, lr=5e-2, precision="fp32", progress=False)
    objective = make_objective("sft", tok, None, config.beta)
    history = train_adapter(wrapped, objective, objective.encode(records), config, description="loreft")  # type: ignore[arg-type]
    losses = [step["loss"] for step in history.steps]
    assert losses[-1] < losses[0]
    r = wrapped.interventions[0].rotation.detach()
    torch.testing.assert_close(r @ r.T, torch.eye(2), rtol=0, atol=1e-4)
    assert all(not p.requires_grad for p in model.parameters() if not any(p is q for q in params))


def test_bad_configurations_raise_lofit_errors() -> None:
    model = tiny_model("llama", 0)
    with pytest.raises(LoreftError, match="layers"):
        get_loreft_model(model, layers=[99])
    with pytest.raises(LoreftError, match="rank"):
        get_loreft_model(model, layers=[0], rank=0)
    with pytest.raises(LofitError, match="first and last"):
        get_loreft_model(model, layers=[0], first=0, last=0)
