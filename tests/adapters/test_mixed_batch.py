"""Mixed-adapter batches (`adapter_names=`): each row equals that row run with its adapter alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lofit import LofitConfig, get_lofit_model
from lofit.adapters.model import LofitModel
from lofit.errors import LofitError, LofitRuntimeError, LofitValueError
from tiny_models import ARCHITECTURES, EOS_ID, PAD_ID, tiny_config, tiny_model

NAMES = ["a", "b", "__base__", "c", "a"]


def _model(attn: str = "eager", model_type: str = "llama") -> LofitModel:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation=attn).eval()
    model = get_lofit_model(base, LofitConfig(heads={0: [1], 2: [0, 3]}, init_std=0.5), "a")
    model.add_adapter("b", LofitConfig(heads={1: [2], 2: [3]}, use_scale=True, init_std=0.5))
    model.add_adapter("c", LofitConfig(heads={1: [0, 1]}, use_scale=True, use_offset=False, init_std=0.5))
    return model.eval()


def _batch(rows: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths (row i has i pad tokens, at most 3)."""
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (rows, 7))
    mask = torch.ones_like(ids)
    for row in range(rows):
        pad = min(row, 3)
        ids[row, :pad], mask[row, :pad] = PAD_ID, 0
    return ids, mask


def _solo(model: LofitModel, name: str, fn):  # type: ignore[no-untyped-def]
    """Run `fn()` with only `name` applied (the base model for "__base__")."""
    if name == "__base__":
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    return fn()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_forward_rows_equal_their_adapter_alone(attn: str) -> None:
    model = _model(attn)
    ids, mask = _batch()
    mixed = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    for row, name in enumerate(NAMES):
        alone = _solo(model, name, lambda: model(input_ids=ids, attention_mask=mask).logits)
        assert torch.allclose(mixed[row], alone[row], atol=1e-6, rtol=0), (row, name)
        # and the row on its own, unpadded (a different batch, so a tolerance)
        keep = mask[row].bool()
        single = _solo(model, name, lambda: model(input_ids=ids[row : row + 1, keep]).logits)  # noqa: B023
        assert torch.allclose(mixed[row, keep], single[0], atol=1e-5), (row, name)
    with model.disable_adapter():
        base = model(input_ids=ids, attention_mask=mask).logits
    for row, name in enumerate(NAMES):  # the test can fail: adapters do change the rows
        assert torch.equal(mixed[row], base[row]) == (name == "__base__")


def test_active_adapter_and_state_unchanged_after_a_mixed_call() -> None:
    model = _model()
    ids, mask = _batch()
    model.set_adapter("b")
    before = model(input_ids=ids, attention_mask=mask).logits
    model(input_ids=ids, attention_mask=mask, adapter_names=NAMES)
    assert model.active_adapter == "b"
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    assert all(p.row_vectors is None for p in model.projections())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_rows_equal_their_adapter_alone(attn: str, use_cache: bool) -> None:
    model = _model(attn)
    ids, mask = _batch()
    kwargs = dict(
        attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD_ID, eos_token_id=None,
        use_cache=use_cache, output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    mixed = model.generate(ids, adapter_names=NAMES, **kwargs)
    for row, name in enumerate(NAMES):
        alone = _solo(model, name, lambda: model.generate(ids, **kwargs))
        assert torch.equal(mixed.sequences[row], alone.sequences[row]), (row, name)
        for step_mixed, step_alone in zip(mixed.scores, alone.scores, strict=True):
            assert torch.allclose(step_mixed[row], step_alone[row], atol=1e-5), (row, name)


def test_beam_search_and_return_sequences_keep_each_rows_adapter() -> None:
    model = _model()
    ids, mask = _batch(3)
    names = ["b", "__base__", "a"]
    kwargs = dict(
        attention_mask=mask, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID,
    )  # fmt: skip
    mixed = model.generate(ids, adapter_names=names, **kwargs)
    assert mixed.shape[0] == 6
    for row, name in enumerate(names):
        alone = _solo(model, name, lambda: model.generate(ids, **kwargs))
        assert torch.equal(mixed[2 * row : 2 * row + 2], alone[2 * row : 2 * row + 2]), (row, name)


def test_gpt2_conv1d_projection() -> None:
    base = tiny_model("gpt2")
    model = get_lofit_model(base, LofitConfig(heads={0: [0], 1: [2]}, init_std=0.5), "a").eval()
    model.add_adapter("b", LofitConfig(heads={2: [1]}, use_scale=True, init_std=0.5))
    ids = torch.randint(3, 100, (3, 5))
    mixed = model(input_ids=ids, adapter_names=["b", "a", "__base__"]).logits
    for row, name in enumerate(["b", "a", "__base__"]):
        alone = _solo(model, name, lambda: model(input_ids=ids).logits)
        assert torch.allclose(mixed[row], alone[row], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (["a", "nope", "b", "a", "a"], r"unknown adapter name\(s\) \['nope'\].*'a', 'b', 'c'"),
        (["a", "b"], "2 name\\(s\\) but the batch has 5 row"),
        ("a", "one adapter name per row"),
        ([], "2 name|0 name"),
        (["a", 3, "b", "a", "a"], "unknown adapter name"),
    ],
)
def test_bad_adapter_names_are_clear_errors(names: object, match: str) -> None:
    model = _model()
    ids, mask = _batch()
    with pytest.raises(LofitValueError, match=match):
        model(input_ids=ids, attention_mask=mask, adapter_names=names)
    with pytest.raises(LofitValueError, match=match):
        model.generate(ids, attention_mask=mask, adapter_names=names, max_new_tokens=2, pad_token_id=PAD_ID)


def test_refused_in_training_merged_or_disabled_state() -> None:
    model = _model()
    ids, _ = _batch()
    model.train()
    with pytest.raises(LofitRuntimeError, match=r"inference only.*model\.eval"):
        model(input_ids=ids, labels=ids, adapter_names=NAMES)
    model.eval()
    model.merge_adapter("a")
    with pytest.raises(LofitRuntimeError, match="unmerge_adapter"):
        model(input_ids=ids, adapter_names=NAMES)
    model.unmerge_adapter()
    with model.disable_adapter(), pytest.raises(LofitError, match="disable_adapter"):
        model(input_ids=ids, adapter_names=NAMES)
    assert all(p.row_vectors is None for p in model.projections())
    model(input_ids=ids, adapter_names=NAMES)  # and fine again afterwards


def test_assisted_generation_refused() -> None:
    model = _model()
    ids, _ = _batch()
    with pytest.raises(LofitValueError, match="assisted generation"):
        model.generate(ids, adapter_names=NAMES, prompt_lookup_num_tokens=2, max_new_tokens=2)


def test_bf16_offset_rows_match_their_solo_run() -> None:
    model = _model()
    model.delete_adapter("b")
    model.delete_adapter("c")
    model.add_adapter("d", LofitConfig(heads={1: [3]}, init_std=0.5))
    model.to(torch.bfloat16).eval()
    ids, mask = _batch()
    names = ["a", "d", "__base__", "d", "a"]
    mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    for row, name in enumerate(names):  # offset-only adapters: the same bf16 add as running alone
        alone = _solo(model, name, lambda: model(input_ids=ids, attention_mask=mask).logits)
        assert torch.equal(mixed[row], alone[row]), (row, name)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_every_architecture_forward_and_cached_generate(model_type: str) -> None:
    model = get_lofit_model(tiny_model(model_type), LofitConfig(heads={0: [0], 2: [1]}, init_std=0.5), "a")
    model.add_adapter("b", LofitConfig(heads={1: [3]}, use_scale=True, init_std=0.5))
    model.eval()
    ids = torch.randint(3, 100, (3, 5), generator=torch.Generator().manual_seed(0))
    names = ["b", "__base__", "a"]
    mixed = model(input_ids=ids, adapter_names=names).logits
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD_ID, eos_token_id=None)
    generated = model.generate(ids, adapter_names=names, **kwargs)
    for row, name in enumerate(names):
        alone = _solo(model, name, lambda: model(input_ids=ids).logits)
        assert torch.allclose(mixed[row], alone[row], atol=1e-6, rtol=0), (model_type, name)
        alone_gen = _solo(model, name, lambda: model.generate(ids, **kwargs))
        assert torch.equal(generated[row], alone_gen[row]), (model_type, name)


def test_base_name_is_reserved() -> None:
    model = _model()
    with pytest.raises(LofitValueError, match="reserved"):
        model.add_adapter("__base__", LofitConfig(heads={0: [0]}))
