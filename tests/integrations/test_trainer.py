"""transformers.Trainer with a LofitModel: signature, what trains, checkpoints, resume, the wrapped base."""

from __future__ import annotations

import doctest
import inspect
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

import lofit
from lofit.errors import AdapterLoadError, LofitError
from lofit.integrations import LofitTrainer
from tiny_models import tiny_model, tiny_tokenizer

HEADS = {1: [0, 2], 2: [3]}
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "one two three four", "red green blue"] * 2


def wrapped(model):  # type: ignore[no-untyped-def]
    """The wrapped transformers model (PEFT's name where it exists)."""
    return model.get_base_model() if "get_base_model" in dir(type(model)) else model.base_model


def lofit_model(seed: int = 0, heads=HEADS):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    return lofit.get_lofit_model(tiny_model("llama", seed), lofit.LofitConfig(heads=heads, init_std=1e-3))


def lm_dataset() -> Dataset:
    tokenizer = tiny_tokenizer()
    encoded = tokenizer(TEXTS, padding="max_length", max_length=24)
    labels = [
        [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]
    return Dataset.from_dict({**encoded, "labels": labels, "text": TEXTS})


def base_state(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {
        k: v.detach().clone() for k, v in wrapped(model).state_dict().items() if "lofit_adapters" not in k
    }


def mean_loss(model, data: Dataset) -> float:  # type: ignore[no-untyped-def]
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        return float(model(**batch).loss)


def args(out: Path, **overrides) -> TrainingArguments:  # type: ignore[no-untyped-def]
    options = dict(report_to=[], disable_tqdm=True, use_cpu=True, seed=3)
    return TrainingArguments(output_dir=str(out), **{**options, **overrides})


def test_forward_shows_the_base_signature_and_labels():
    model = lofit_model()
    base_parameters = inspect.signature(wrapped(model).forward).parameters
    assert list(inspect.signature(model.forward).parameters) == list(base_parameters)
    assert "labels" in inspect.signature(type(model).forward).parameters  # Trainer's label_names
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model(input_ids=ids).logits, model(ids).logits)


def test_plain_trainer_trains_only_the_adapter_with_default_arguments(tmp_path):
    model, data = lofit_model(), lm_dataset()
    before_base, before_adapter = base_state(model), model.get_head_params()
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path)), train_dataset=data)
    assert trainer.label_names == ["labels"]
    result = trainer.train()  # defaults: 3 epochs, lr 5e-5, text column dropped by signature
    assert result.global_step == 3
    after_base = base_state(model)
    assert all(torch.equal(before_base[k], after_base[k]) for k in before_base)
    changed = [
        not torch.equal(before_adapter[h]["offset"], p["offset"]) for h, p in model.get_head_params().items()
    ]
    assert all(changed)
    assert "eval_loss" in trainer.evaluate(data)  # label names found: evaluation computes the loss


def test_lofit_trainer_checkpoints_are_adapter_folders_that_load_exactly(tmp_path):
    model, data = lofit_model(), lm_dataset()
    loss_before = mean_loss(model, data)
    trainer = LofitTrainer(
        model=model, args=args(tmp_path, max_steps=6, save_steps=3, learning_rate=1e-2), train_dataset=data
    )
    trainer.train()
    assert mean_loss(model, data) < loss_before
    for folder in (tmp_path / "checkpoint-3", tmp_path / "checkpoint-6"):
        names = {p.name for p in folder.iterdir()}
        assert {"lofit_config.json", "lofit_model.safetensors", "optimizer.pt", "trainer_state.json"} <= names
        assert "model.safetensors" not in names
        assert (folder / "lofit_model.safetensors").stat().st_size < 4096
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "lofit_config.json").is_file()
    assert json.loads((tmp_path / "final" / "lofit_config.json").read_text())["adapter"]["heads"] == {
        "1": [0, 2],
        "2": [3],
    }
    reloaded = lofit.LofitModel.from_pretrained(tiny_model("llama", 0), tmp_path / "final")
    for head, params in model.get_head_params().items():
        assert torch.equal(reloaded.get_head_params()[head]["offset"], params["offset"])
    ids = torch.tensor([data["input_ids"][0]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
    data = lm_dataset()
    options = dict(max_steps=6, save_steps=3, learning_rate=1e-2, per_device_train_batch_size=4)
    full = lofit_model()
    LofitTrainer(model=full, args=args(tmp_path / "a", **options), train_dataset=data).train()
    resumed = lofit_model()
    trainer = LofitTrainer(model=resumed, args=args(tmp_path / "b", **options), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    for head, params in full.get_head_params().items():
        assert torch.allclose(resumed.get_head_params()[head]["offset"], params["offset"], rtol=0, atol=1e-7)
    wrong_heads = lofit_model(heads={0: [1]})
    trainer = LofitTrainer(model=wrong_heads, args=args(tmp_path / "c", **options), train_dataset=data)
    with pytest.raises(AdapterLoadError, match="same heads"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))


def test_load_best_model_at_end_restores_the_adapter(tmp_path):
    model, data = lofit_model(), lm_dataset()
    options = dict(max_steps=4, save_steps=2, eval_steps=2, eval_strategy="steps", learning_rate=1e-2)
    trainer = LofitTrainer(
        model=model,
        args=args(tmp_path, load_best_model_at_end=True, **options),
        train_dataset=data,
        eval_dataset=data,
    )
    trainer.train()
    best = lofit.LofitModel.from_pretrained(tiny_model("llama", 0), trainer.state.best_model_checkpoint)
    for head, params in best.get_head_params().items():
        assert torch.equal(model.get_head_params()[head]["offset"], params["offset"])


def test_lofit_trainer_resumes_from_a_plain_trainer_checkpoint(tmp_path):
    data = lm_dataset()
    options = dict(max_steps=4, save_steps=2, learning_rate=1e-2, per_device_train_batch_size=4)
    full = lofit_model()
    Trainer(model=full, args=args(tmp_path / "plain", **options), train_dataset=data).train()
    resumed = lofit_model()
    trainer = LofitTrainer(model=resumed, args=args(tmp_path / "b", **options), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-2"))
    for head, params in full.get_head_params().items():
        assert torch.allclose(resumed.get_head_params()[head]["offset"], params["offset"], rtol=0, atol=1e-7)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterLoadError, match=r"neither lofit_config\.json nor model\.safetensors"):
        LofitTrainer(model=lofit_model(), args=args(tmp_path / "c", max_steps=2), train_dataset=data).train(
            resume_from_checkpoint=str(tmp_path / "empty")
        )


def test_the_wrapped_base_refuses_a_save_that_transformers_would_load_with_random_weights(tmp_path):
    model, data = lofit_model(), lm_dataset()
    trainer = Trainer(model=wrapped(model), args=args(tmp_path, max_steps=1), train_dataset=data)
    with pytest.raises(LofitError, match="merge_and_unload"):
        trainer.train()
    assert not list(tmp_path.glob("checkpoint-1/model.safetensors"))
    with pytest.raises(LofitError, match=r"lofit_model\.save_pretrained"):
        wrapped(model).save_pretrained(tmp_path / "direct")
    plain = model.unload()
    plain.save_pretrained(tmp_path / "unloaded")  # no adapter left: the real save runs
    assert (tmp_path / "unloaded" / "model.safetensors").is_file()


def test_doctests_of_the_integration_modules_run():
    import lofit.adapters.visibility as visibility
    import lofit.integrations as package
    import lofit.integrations.trainer as trainer_module

    for module in (package, visibility, trainer_module):
        failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert tried > 0 and failures == 0, module.__name__


def test_inference_after_a_fused_optimizer_step_sees_the_new_vectors():
    """Fused AdamW updates in place without bumping `_version`; the no-grad dense cache must not go stale."""
    model, data = lofit_model(), lm_dataset()
    loss_before = mean_loss(model, data)  # fills the no-grad cache
    optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=0.05, fused=True)
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}
    model(**batch).loss.backward()
    optimizer.step()
    fresh = lofit_model()
    fresh.set_head_params(model.get_head_params())
    assert mean_loss(model, data) == mean_loss(fresh, data) != loss_before


def test_generate_builds_the_vectors_once_and_sees_a_fused_step_between_calls(monkeypatch):
    """Inside one generate call the dense vectors are built once per layer (trainable or not); a fused AdamW
    step between two calls is seen by the second (the cache does not outlive the call)."""
    from lofit.adapters.layer import HeadVectors

    model = lofit_model()
    model.set_head_params({pair: {"offset": torch.full((8,), 0.5)} for pair in [(1, 0), (1, 2), (2, 3)]})
    builds = []
    original = HeadVectors.dense_offset
    monkeypatch.setattr(HeadVectors, "dense_offset", lambda self: builds.append(1) or original(self))

    def scores(of):  # type: ignore[no-untyped-def]
        out = of.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=6, min_new_tokens=6,
                          do_sample=False, output_scores=True, return_dict_in_generate=True)  # fmt: skip
        return torch.stack(out.scores)

    first = scores(model)
    assert len(builds) == 2  # two adapted layers, one build each for the prefill and all 5 decoding steps
    optimizer = torch.optim.AdamW(model.adapter_parameters(), lr=0.5, fused=True)
    batch = {k: torch.tensor(v) for k, v in lm_dataset()[:4].items() if k != "text"}
    model(**batch).loss.backward()
    optimizer.step()  # in place, without bumping the vectors' version counters
    second = scores(model)
    fresh = lofit_model()
    fresh.set_head_params(model.get_head_params())
    assert torch.equal(second, scores(fresh)) and not torch.equal(second, first)


def test_lofit_trainer_checkpoints_a_model_with_tied_embeddings(tmp_path):
    """SmolLM2 and Gemma tie lm_head to the embeddings (a whole state dict cannot be written as safetensors):
    the adapter folder has no shared tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def tied_base():  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)  # fmt: skip
        return LlamaForCausalLM(config)

    model = lofit.get_lofit_model(tied_base(), lofit.LofitConfig(heads={1: [1, 3]}))
    assert wrapped(model).lm_head.weight is wrapped(model).model.embed_tokens.weight
    trainer = LofitTrainer(model=model, args=args(tmp_path, max_steps=2, save_steps=2, learning_rate=1e-2),
                           train_dataset=lm_dataset())  # fmt: skip
    trainer.train()
    reloaded = lofit.LofitModel.from_pretrained(tied_base(), tmp_path / "checkpoint-2")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def tied_base():  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tied", [True, False], ids=["tied-embeddings", "untied"])
def test_plain_trainer_saves_checkpoints_and_resumes_the_adapter(tmp_path, tied):
    """transformers.Trainer writes `model.state_dict()`: for a LofitModel the adapter (vectors + config), a few
    KB with no shared tensors, that from_pretrained loads exactly; resuming from it equals an uninterrupted run."""
    make_base = tied_base if tied else (lambda: tiny_model("llama", 0))
    data = lm_dataset()
    options = dict(max_steps=4, save_steps=2, learning_rate=1e-2, per_device_train_batch_size=4)
    full = lofit.get_lofit_model(make_base(), lofit.LofitConfig(heads=HEADS))
    assert (wrapped(full).lm_head.weight is wrapped(full).model.embed_tokens.weight) == tied
    trainer = Trainer(model=full, args=args(tmp_path / "a", **options), train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "a" / "checkpoint-2", tmp_path / "a" / "checkpoint-4", tmp_path / "final"):
        assert (folder / "model.safetensors").stat().st_size < 16_000  # the adapter, not the base
    ids = torch.tensor([data["input_ids"][0]])
    reloaded = lofit.LofitModel.from_pretrained(make_base(), tmp_path / "final")
    assert reloaded.selected_heads() == HEADS and not any(p.requires_grad for p in reloaded.parameters())
    for head, params in full.get_head_params().items():
        assert torch.equal(reloaded.get_head_params()[head]["offset"], params["offset"])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, full(input_ids=ids).logits)
    resumed = lofit.get_lofit_model(make_base(), lofit.LofitConfig(heads=HEADS))
    Trainer(model=resumed, args=args(tmp_path / "b", **options), train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2")
    )
    for head, params in full.get_head_params().items():
        assert torch.allclose(resumed.get_head_params()[head]["offset"], params["offset"], rtol=0, atol=1e-7)


def test_plain_trainer_loads_the_best_adapter_at_the_end(tmp_path):
    model, data = lofit_model(), lm_dataset()
    options = dict(max_steps=4, save_steps=2, eval_steps=2, eval_strategy="steps", learning_rate=1e-2)
    trainer = Trainer(model=model, args=args(tmp_path, load_best_model_at_end=True, **options),
                      train_dataset=data, eval_dataset=data)  # fmt: skip
    trainer.train()
    best = lofit.LofitModel.from_pretrained(tiny_model("llama", 0), trainer.state.best_model_checkpoint)
    for head, params in best.get_head_params().items():
        assert torch.equal(model.get_head_params()[head]["offset"], params["offset"])


def test_state_dict_is_the_adapter_and_load_state_dict_refuses_what_does_not_fit():
    from lofit.errors import BaseModelMismatchError

    model = lofit_model()
    state = model.state_dict()
    assert sorted(state) == [
        "base_model.codes",  # the base fingerprint, a few bytes per base tensor
        "base_model.sum_sq",
        "layers.1.heads",
        "layers.1.offset",
        "layers.2.heads",
        "layers.2.offset",
        "lofit_config",
    ]
    other = lofit.get_lofit_model(tiny_model("llama", 0), lofit.LofitConfig(heads=HEADS, init_std=0.5))
    other.load_state_dict(state)
    assert all(torch.equal(a["offset"], b["offset"]) for a, b in
               zip(model.get_head_params().values(), other.get_head_params().values(), strict=True))  # fmt: skip
    assert all(p.requires_grad for p in other.adapter_parameters())  # trainable flags kept
    with pytest.raises(AdapterLoadError, match="active adapter 'default' has heads"):
        lofit_model(heads={0: [1]}).load_state_dict(state)
    with pytest.raises(BaseModelMismatchError):
        lofit.get_lofit_model(tiny_model("llama", 5), lofit.LofitConfig(heads=HEADS)).load_state_dict(state)
    with pytest.raises(AdapterLoadError, match=r"get_base_model\(\)\.load_state_dict"):
        model.load_state_dict(wrapped(model).state_dict())


def test_copies_and_pickles_run_their_own_weights():
    """The signature-carrying forward is an instance attribute: a deep copy or an unpickled model must run itself."""
    import copy
    import pickle

    model = lofit_model()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for param in clone.adapter_parameters():
            param.add_(1.0)
        ids = torch.tensor([[5, 6, 7]])
        assert clone.forward.__self__ is clone
        assert not torch.equal(clone(input_ids=ids).logits, model(input_ids=ids).logits)
        restored = pickle.loads(pickle.dumps(model))
        assert torch.equal(restored(input_ids=ids).logits, model(input_ids=ids).logits)


def test_lofit_trainer_leaves_other_models_to_trainer(tmp_path):
    plain = tiny_model("llama", 0)
    trainer = LofitTrainer(model=plain, args=args(tmp_path, max_steps=1), train_dataset=lm_dataset())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert not (tmp_path / "final" / "lofit_config.json").exists()


@pytest.mark.parametrize("reentrant", [False, True])
def test_trainer_with_gradient_checkpointing_still_trains_the_adapter(tmp_path, reentrant):
    model = lofit_model()
    before = model.get_head_params()
    options = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    LofitTrainer(model=model, args=args(tmp_path, max_steps=2, learning_rate=1e-2, **options),
                 train_dataset=lm_dataset()).train()  # fmt: skip
    assert all(not torch.equal(before[h]["offset"], p["offset"]) for h, p in model.get_head_params().items())
