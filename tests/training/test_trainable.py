"""The loop trains any `TrainableAdapter` (LoFiT, RED, PEFT LoRA through `AdapterView`), and the DPO reference
is always the base model with the adapter disabled: for every adapter, before the first step, after
--resume and for validation records."""

from __future__ import annotations

import pytest
import torch

from lofit import LofitConfig, get_lofit_model
from lofit.baselines import get_red_model, trainable_parameters
from lofit.errors import LofitError
from lofit.training.logprobs import TokenScorer, sequence_logps
from lofit.training.loop import train_adapter
from lofit.training.losses import DPOObjective
from lofit.training.settings import TrainingConfig
from lofit.training.trainable import AdapterView, TrainableAdapter, causal_lm_of
from tiny_models import tiny_model, tiny_tokenizer

PAIRS = [
    {"prompt": f"{a}+{b}=", "chosen": f"{a + b}", "rejected": f"{a * b + 1}!"}
    for a in range(3)
    for b in range(3)
]


def red_with_random_vectors(seed: int = 1) -> AdapterView:
    """RED whose vectors are not zero: unlike at RED's own init, the adapter changes the logits from step 0."""
    red = get_red_model(tiny_model("llama"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in red.red_parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return AdapterView(red, red.red_parameters())


def lora_with_random_b() -> AdapterView:
    from lofit.baselines import get_lora_model

    lora = get_lora_model(tiny_model("llama"), dropout=0.0)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    return AdapterView(lora, trainable_parameters(lora))


def base_logps(objective: DPOObjective, examples) -> list[tuple[float, float]]:  # type: ignore[no-untyped-def]
    """The oracle: summed log-probs of chosen/rejected under a fresh copy of the bare base model."""
    scorer = TokenScorer(tiny_model("llama"))
    with torch.no_grad():
        batch = objective.batch(examples)
        pairs = sequence_logps(scorer(batch), batch).view(len(examples), 2).tolist()
    return [(a, b) for a, b in pairs]


@pytest.mark.parametrize("build", [red_with_random_vectors, lora_with_random_b], ids=["red", "lora"])
def test_dpo_reference_is_the_bare_base_for_any_adapter(build) -> None:  # type: ignore[no-untyped-def]
    model = build()
    assert isinstance(model, TrainableAdapter)
    objective = DPOObjective(tiny_tokenizer(), beta=0.5)
    examples = objective.encode(PAIRS)
    expected = base_logps(objective, examples)
    objective.prepare(TokenScorer(model), examples, batch_size=4, device="cpu")
    got = [e.reference_logps for e in examples]
    assert got == [pytest.approx(pair, abs=1e-5) for pair in expected]
    # the adapter really changes the log-probs, so a reference computed with it on would differ
    with torch.no_grad():
        batch = objective.batch(examples)
        adapted = sequence_logps(TokenScorer(model)(batch), batch)
    assert (adapted - torch.tensor(expected).flatten()).abs().max() > 1e-2


def dpo_run(tmp_path, **options):  # type: ignore[no-untyped-def]
    model = red_with_random_vectors()
    objective = DPOObjective(tiny_tokenizer(), beta=0.5)
    train, val = objective.encode(PAIRS), objective.encode(PAIRS[:3])
    config = TrainingConfig(
        epochs=2, batch_size=4, lr=0.05, progress=False, output_dir=str(tmp_path), **options
    )
    history = train_adapter(model, objective, train, config, val_examples=val, description="red dpo")
    return [p.detach().clone() for p in model.adapter_parameters()], history


def test_resumed_dpo_run_of_a_non_lofit_adapter_equals_an_uninterrupted_one(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Before the fix the references were recomputed on resume with the trained adapter switched on."""
    import lofit.training.loop

    expected, full = dpo_run(tmp_path / "full")
    save = lofit.training.loop.save_checkpoint

    def stop_after_step_2(root, position, **rest):  # type: ignore[no-untyped-def]
        path = save(root, position, **rest)
        if position.step == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(lofit.training.loop, "save_checkpoint", stop_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        dpo_run(tmp_path / "cut", checkpoint_every=1)
    monkeypatch.setattr(lofit.training.loop, "save_checkpoint", save)
    resumed, history = dpo_run(tmp_path / "cut", checkpoint_every=1, resume=True)
    assert history.settings["resumed_from_step"] == 2
    for a, b in zip(expected, resumed, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert history.losses() == pytest.approx(full.losses(), abs=1e-6)
    # validation after epoch 1 (its references computed after the resume) agrees as well
    assert [v["val_loss"] for v in history.validation] == pytest.approx(
        [v["val_loss"] for v in full.validation], abs=1e-6
    )


def test_first_dpo_loss_uses_the_bare_base_as_reference() -> None:
    """A non-zero adapter's first DPO loss (not log 2): the
    oracle computes it from the bare base's and the adapted model's log-probs."""
    model = red_with_random_vectors()
    objective = DPOObjective(tiny_tokenizer(), beta=0.5)
    examples = objective.encode(PAIRS[:4])
    reference = torch.tensor(base_logps(objective, examples))
    with torch.no_grad():
        batch = objective.batch(examples)
        policy = sequence_logps(TokenScorer(model)(batch), batch).view(4, 2)
    margin = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    expected = float(-torch.nn.functional.logsigmoid(0.5 * margin).mean())
    config = TrainingConfig(epochs=1, batch_size=4, lr=1e-9, progress=False)
    history = train_adapter(model, objective, examples, config)
    assert history.losses()[0] == pytest.approx(expected, abs=1e-5)


def test_adapter_view_trains_only_the_given_parameters_of_a_peft_model() -> None:
    model = lora_with_random_b()
    lora = model.model
    assert causal_lm_of(model) is lora.get_base_model()
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_" not in n}
    before = [p.detach().clone() for p in model.adapter_parameters()]
    objective = DPOObjective(tiny_tokenizer())
    config = TrainingConfig(epochs=1, batch_size=3, lr=0.05, progress=False)
    train_adapter(model, objective, objective.encode(PAIRS), config)
    assert all(torch.equal(frozen[n], p) for n, p in lora.named_parameters() if "lora_" not in n)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.adapter_parameters(), strict=True))


def test_lofit_model_satisfies_the_protocol_and_a_module_without_switch_is_refused() -> None:
    lofit_model = get_lofit_model(tiny_model("llama"), LofitConfig(heads={0: [1]}))
    assert isinstance(lofit_model, TrainableAdapter)
    assert causal_lm_of(lofit_model) is lofit_model.get_base_model()
    with pytest.raises(LofitError, match="disable_adapter"):
        AdapterView(torch.nn.Linear(2, 2))
