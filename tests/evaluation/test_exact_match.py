"""Exact match: extraction rules on hand-written strings, left-padded batched greedy generation, metrics."""

from __future__ import annotations

import pytest
import torch

from lofit import LofitConfig, get_lofit_model
from lofit.evaluation import evaluate, exact_match
from lofit.evaluation.extraction import extract, matches
from lofit.evaluation.generation import Generation, generate_greedy
from tiny_models import tiny_model, tiny_tokenizer

MQ_PROMPT = (
    "Q: Imagine that John Krasinski is a citizen of Sweden. Which country is his spouse a citizen of? A:"
)
CL_PROMPT = (
    'Read the following story about a family. "..." how is Roy related to Cleo? Answer: Roy is Cleo \'s\n'
)


@pytest.mark.parametrize(
    ("completion", "prediction", "exact", "stripped"),
    [
        ("Sweden\nQ: next", "sweden", True, True),
        (" Sweden\n", " sweden", False, True),  # the authors do not strip
        ("SWEDEN", "sweden", True, True),
        ("Kingdom of Sweden", "kingdom of sweden", True, True),
        (" Paris\nQ: Imagine more. A: Sweden", " sweden", False, True),  # the *last* "A:", even generated
        (" Paris. A:Sweden\nQ:", "sweden", True, True),
        ("", "", False, False),
    ],
)
def test_mquake_extraction(completion, prediction, exact, stripped):
    got = extract(MQ_PROMPT + completion, completion, "mquake")
    assert got == prediction
    answers = ["Sweden", "Kingdom of Sweden", "SE"]
    assert matches(got, answers, "mquake") is exact
    assert matches(got, answers, "mquake", stripped=True) is stripped


@pytest.mark.parametrize(
    ("completion", "prediction"),
    [
        ("grandfather. He is old", "grandfather"),
        ("  Grandfather .\n", "grandfather"),
        ("son's\nfather.", "son"),  # stops at the next "'s\n", as split("'s\n")[1] does
        ("uncle", "uncle"),
        ("", ""),
    ],
)
def test_clutrr_extraction(completion, prediction):
    assert extract(CL_PROMPT + completion, completion, "clutrr") == prediction


def test_clutrr_without_the_answer_mark_uses_the_completion():
    assert extract("Relation:" + " Aunt. x", " Aunt. x", "clutrr") == "aunt"


def test_plain_extraction_is_the_completion():
    assert extract("p 42", " 42", None) == " 42"
    assert not matches(" 42", ["42"], None)
    assert matches(" 42", ["42"], None, stripped=True)
    assert not matches("Paris", ["paris"], None)  # no lower-casing without an extraction rule


def test_exact_match_metrics_from_known_generations(monkeypatch):
    records = [
        {"prompt": MQ_PROMPT, "answers": ["Sweden"]},
        {"prompt": MQ_PROMPT, "answers": ["Sweden"]},
        {"prompt": MQ_PROMPT, "answers": ["Norway"]},
    ]
    completions = ["Sweden\n", " Sweden", "Sweden"]

    def fake_generate(model, tokenizer, prompts, **kwargs):
        return [Generation(c, p + c, []) for p, c in zip(prompts, completions, strict=True)]

    monkeypatch.setattr(exact_match, "generate_greedy", fake_generate)
    metrics, details = evaluate(
        tiny_model("llama"),
        tiny_tokenizer(),
        "exact_match",
        records,
        extraction="mquake",
        return_details=True,
    )
    assert metrics == {"exact_match": pytest.approx(1 / 3), "exact_match_stripped": pytest.approx(2 / 3)}
    assert [d["prediction"] for d in details] == ["sweden", " sweden", "sweden"]
    clutrr = evaluate(tiny_model("llama"), tiny_tokenizer(), "exact_match", records, extraction="clutrr")
    assert set(clutrr) == {"exact_match"}


def varied_model(model_type: str) -> torch.nn.Module:
    """A tiny model with large random weights, so greedy continuations differ from prompt to prompt."""
    model = tiny_model(model_type)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3, generator=generator)
    return get_lofit_model(model, LofitConfig(use_scale=True, init_std=0.3))


PROMPTS = [MQ_PROMPT, "Hi", CL_PROMPT, "abc def ghi jkl", "Q: x? A:"]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "gemma2"])
def test_batched_left_padded_generation_equals_one_by_one(model_type):
    model, tokenizer = varied_model(model_type), tiny_tokenizer()
    batched = generate_greedy(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=5, progress=False)
    single = [generate_greedy(model, tokenizer, [p], max_new_tokens=10, progress=False)[0] for p in PROMPTS]
    assert [g.new_token_ids for g in batched] == [g.new_token_ids for g in single]
    assert len({g.completion for g in batched}) > 1  # the check is not vacuous
    assert tokenizer.padding_side == "right"  # the caller's tokenizer is left as it was
    for prompt, generation in zip(PROMPTS, batched, strict=True):
        assert len(generation.new_token_ids) <= 10
        assert generation.full_text == prompt + generation.completion  # char tokenizer: lossless


def test_generation_stops_at_eos():
    model, tokenizer = varied_model("llama"), tiny_tokenizer()
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # make EOS the argmax everywhere
        model.get_base_model().lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.get_base_model().lm_head.bias[eos] = 1e4
    (generation,) = generate_greedy(model, tokenizer, ["abc"], max_new_tokens=8, progress=False)
    assert generation.new_token_ids == [eos]
    assert generation.completion == ""


def test_exact_match_end_to_end_on_a_tiny_model():
    model, tokenizer = varied_model("llama"), tiny_tokenizer()
    (generation,) = generate_greedy(model, tokenizer, ["Q: x? A:"], max_new_tokens=6, progress=False)
    assert "\n" not in generation.completion and "A:" not in generation.completion  # fixed by the seed
    records = [
        {"prompt": "Q: x? A:", "answers": [generation.completion.upper()]},  # right up to case
        {"prompt": "Q: x? A:", "answers": ["not " + generation.completion]},
    ]
    metrics = evaluate(
        model, tokenizer, "exact_match", records, extraction="mquake", max_new_tokens=6, progress=False
    )
    assert metrics == {"exact_match": 0.5, "exact_match_stripped": 0.5}
