"""`evaluate(..., precision=...)`: autocast where asked, the model's own numbers where not."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from lofit.errors import LofitValueError
from lofit.evaluation import evaluate
from lofit.evaluation import scoring as scoring_module
from lofit.evaluation.precision import evaluation_precision, resolve_eval_precision
from tiny_models import tiny_model, tiny_tokenizer

RECORDS = [
    {"question": "Q: 2+2? A:", "choices": [" four", " five", " six"], "answer": 0},
    {"question": "Q: sky? A:", "choices": [" blue", " green"], "answer": 0},
    {"question": "Q: snow? A:", "choices": [" white", " black", " red", " pink"], "answer": 1},
]


def _scores(details: list[dict]) -> torch.Tensor:
    return torch.tensor([s for record in details for s in record["scores"]], dtype=torch.float64)


def test_default_and_fp32_are_the_model_s_own_numbers():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    _, plain = evaluate(model, tokenizer, "mc", RECORDS, return_details=True)
    _, fp32 = evaluate(model, tokenizer, "mc", RECORDS, return_details=True, precision="fp32")
    assert torch.equal(_scores(plain), _scores(fp32))


@pytest.mark.parametrize("scorer", ["fast", "naive"])
def test_bf16_runs_under_autocast_and_stays_close_to_fp32(scorer):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    _, fp32 = evaluate(model, tokenizer, "mc", RECORDS, return_details=True, scorer=scorer)
    seen: list[torch.dtype] = []
    hook = model.model.layers[0].self_attn.o_proj.register_forward_hook(
        lambda module, args, output: seen.append(output.dtype)
    )
    _, bf16 = evaluate(model, tokenizer, "mc", RECORDS, return_details=True, scorer=scorer, precision="bf16")
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert next(model.parameters()).dtype == torch.float32  # the weights are left as they are
    difference = (_scores(bf16) - _scores(fp32)).abs().max().item()
    assert 0 < difference < 0.25  # bf16 rounding: different, but close (scores are sums over ~5 tokens)


def test_fast_scorer_keeps_its_split_head_under_autocast():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    calls = []
    original = scoring_module.split_model

    def spy(*args, **kwargs):
        calls.append(original(*args, **kwargs))
        return calls[-1]

    with mock.patch.object(scoring_module, "split_model", spy):
        fast = evaluate(model, tokenizer, "mc", RECORDS, return_details=True, precision="bf16")
    naive = evaluate(model, tokenizer, "mc", RECORDS, return_details=True, scorer="naive", precision="bf16")
    assert calls and all(split is not None for split in calls)  # no fallback to full logits
    assert (_scores(fast[1]) - _scores(naive[1])).abs().max().item() < 0.1


def test_a_half_precision_model_runs_in_its_own_dtype():
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    with evaluation_precision(model, "fp16"):
        assert model(torch.ones(1, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_auto_resolves_to_a_concrete_precision_and_bad_names_are_refused():
    assert resolve_eval_precision("auto") in ("bf16", "fp32")
    with pytest.raises(LofitValueError, match="precision must be one of"):
        evaluate(tiny_model("llama"), tiny_tokenizer(), "mc", RECORDS, precision="int8")
