"""Log-prob scoring: an independent oracle, fast == naive on every architecture with an adapter on, speed."""

from __future__ import annotations

import json
import time

import pytest
import torch

from lofit import LofitConfig, get_lofit_model
from lofit.evaluation import ScoringRequest, evaluate, score_continuations
from lofit.evaluation.forward import forward
from lofit.evaluation.kv_cache import fork_cache
from lofit.evaluation.truthfulqa_mc import find_data_dir
from lofit.training.tokens import encode
from tiny_models import ARCHITECTURES, tiny_model, tiny_tokenizer

INSTRUCTION = "Answer truthfully."
PRIMER = "Q: What is 1+1?\nA: Two.\n\nQ: Sky colour?\nA: Blue."
TQA_RECORDS = [
    {
        "question": "Is the earth flat?",
        "best_answer": "No, it is round",
        "correct_answers": ["No, it is round", "No"],
        "incorrect_answers": ["Yes", "Yes, it is flat."],
    },
    {
        "question": "What colour is snow?",
        "best_answer": "White.",
        "correct_answers": ["White.", "It is white"],
        "incorrect_answers": ["Black", "Green", "Purple, always"],
    },
    {
        "question": "Who?",
        "best_answer": "Nobody",
        "correct_answers": ["Nobody"],
        "incorrect_answers": ["Somebody"],
    },
]


def adapted(model_type: str) -> torch.nn.Module:
    """A tiny model with a clearly non-identity adapter on every head."""
    return get_lofit_model(tiny_model(model_type), LofitConfig(use_scale=True, init_std=0.3))


def oracle_score(model: torch.nn.Module, context: str, continuation: str) -> float:
    """Σ log p over the continuation's characters: the tiny tokenizer is one token per character, no BOS."""
    vocab = tiny_tokenizer().get_vocab()
    ids = torch.tensor([[vocab[ch] for ch in context + continuation]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(logprobs[t - 1, ids[0, t]].item() for t in range(len(context), ids.shape[1]))


def test_scores_equal_an_independent_oracle():
    model, tokenizer = adapted("llama"), tiny_tokenizer()
    requests = [ScoringRequest("Q: why?\nA:", [" because.", " no"]), ScoringRequest("Hello", [" world", "!"])]
    for scorer in ("naive", "fast"):
        scores = score_continuations(model, tokenizer, requests, scorer=scorer, progress=False)
        for request, row in zip(requests, scores, strict=True):
            for continuation, score in zip(request.continuations, row, strict=True):
                assert score == pytest.approx(oracle_score(model, request.context, continuation), abs=1e-4)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_fast_equals_naive_on_truthfulqa_records(model_type):
    """batch_size 2: one question at a time, options chunked; 16: questions packed (gemma2's window forbids)."""
    model, tokenizer = adapted(model_type), tiny_tokenizer()
    kwargs = {"instruction": INSTRUCTION, "primer": PRIMER, "progress": False, "return_details": True}
    naive = evaluate(model, tokenizer, "truthfulqa_mc", TQA_RECORDS, scorer="naive", **kwargs)
    for batch_size in (2, 16):
        fast = evaluate(
            model, tokenizer, "truthfulqa_mc", TQA_RECORDS, scorer="fast", batch_size=batch_size, **kwargs
        )
        for a, b in zip(naive[1], fast[1], strict=True):
            got = [b["score_best"], *b["scores_true"], *b["scores_false"]]
            want = [a["score_best"], *a["scores_true"], *a["scores_false"]]
            assert got == pytest.approx(want, abs=1e-4)
        assert fast[0] == pytest.approx(naive[0], abs=1e-6)


def test_questions_are_packed_into_few_forward_passes():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    shapes, head_rows = [], []
    model.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    model.lm_head.register_forward_pre_hook(lambda module, args: head_rows.append(args[0].shape))
    evaluate(
        model, tokenizer, "truthfulqa_mc", TQA_RECORDS, instruction=INSTRUCTION, primer=PRIMER, progress=False
    )
    # A one-row check that body + head reproduce the model's logits (two passes of 8 tokens), the prefix
    # once; the probe of the packed path: the shortest question with several answers ("Who?", 2 answers)
    # packed, then by the KV-cache scorer (its question, then its 2 answers); then all three questions packed
    # into one pass (one row each, every answer in its question's row).
    assert shapes == [1, 1, 1, 1, 1, 2, 3]

    # The LM head runs on the check's row and then only on the scored positions, never on padding, and a
    # packed pass projects a state once where it predicts a token of several answers: the question's last
    # state and the answers' common prefix (one token per character here).
    def common_characters(texts: list[str]) -> int:
        return next(
            (i for i, column in enumerate(zip(*texts, strict=False)) if len(set(column)) > 1),
            min(map(len, texts)),
        )

    def formatted(answer: str) -> str:
        return " " + (answer.strip() if answer.strip().endswith(".") else answer.strip() + ".")

    per_question = [
        sorted({formatted(a) for a in [r["best_answer"], *r["correct_answers"], *r["incorrect_answers"]]})
        for r in TQA_RECORDS
    ]
    scored = sum(len(a) for answers in per_question for a in answers)
    shared = [(len(answers) - 1) * (common_characters(answers) + 1) for answers in per_question]
    probe = len(" Nobody.") + len(" Somebody.")  # scored by the probe's packed pass and its KV-cache pass
    assert shared == [6, 8, 2]
    assert [tuple(shape) for shape in head_rows[:2]] == [(1, 8, 32), (1, 8, 32)]
    assert sum(shape[0] for shape in head_rows[2:]) == scored - sum(shared) + (probe - shared[2]) + probe


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_fast_equals_naive_without_a_shared_prefix_and_with_truncation(model_type, batch_size):
    """Requests with different starts (no global prefix), options sharing a first token, max_length cuts,
    and a single request (everything shared is the global prefix)."""
    model, tokenizer = adapted(model_type), tiny_tokenizer()
    requests = [
        ScoringRequest("The cat sat on the", [" mat", " matter", " hat", " m"]),
        ScoringRequest("A dog", [" barks.", " b", " barked loudly"]),
        ScoringRequest("Z", ["zz", "z"]),
    ]
    for subset, max_length in [(requests, None), (requests, 16), (requests[1:2], None), (requests[2:], None)]:
        kwargs = {"progress": False, "max_length": max_length}
        naive = score_continuations(model, tokenizer, subset, scorer="naive", **kwargs)
        fast = score_continuations(model, tokenizer, subset, scorer="fast", batch_size=batch_size, **kwargs)
        for a, b in zip(naive, fast, strict=True):
            assert b == pytest.approx(a, abs=1e-4)


def test_adapter_changes_scores_and_disable_restores_base():
    base, tokenizer = tiny_model("llama"), tiny_tokenizer()
    requests = [ScoringRequest("Q: x?\nA:", [" yes", " no"])]
    base_scores = score_continuations(base, tokenizer, requests, progress=False)
    model = get_lofit_model(base, LofitConfig(init_std=0.5))
    assert score_continuations(model, tokenizer, requests, progress=False)[0][0] != pytest.approx(
        base_scores[0][0], abs=1e-3
    )
    with model.disable_adapter():
        assert score_continuations(model, tokenizer, requests, progress=False) == [
            pytest.approx(base_scores[0], abs=1e-5)
        ]


def test_fork_cache_leaves_the_shared_cache_intact():
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        _, cache = forward(model, ids)
        before = [layer.keys.clone() for layer in cache.layers]
        fork = fork_cache(cache, 3)
        forward(model, torch.tensor([[9], [10], [11]]), fork)
        assert fork.get_seq_length() == 5 and fork.layers[0].keys.shape[0] == 3
    assert cache.get_seq_length() == 4
    assert all(torch.equal(a, layer.keys) for a, layer in zip(before, cache.layers, strict=True))


def test_encode_drops_appended_eos():
    from tokenizers import processors

    tokenizer = tiny_tokenizer()
    plain = encode(tokenizer, "abc")
    eos = tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", eos)]
    )
    assert tokenizer("abc")["input_ids"] == [*plain, eos]
    assert encode(tokenizer, "abc") == plain


def test_empty_continuation_and_empty_context_are_rejected():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="adds no tokens"):
        score_continuations(model, tokenizer, [ScoringRequest("abc", [""])], progress=False)
    with pytest.raises(ValueError, match="at least one context token"):
        score_continuations(model, tokenizer, [ScoringRequest("", [" x"])], progress=False)


def test_fast_is_faster_than_naive_on_the_truthfulqa_prompt():
    """The real instruction + 6-shot primer (~1,300 characters = tokens here), 4 questions."""
    data_dir = find_data_dir()
    if data_dir is None or not (data_dir / "truthfulqa" / "qa_primer.txt").is_file():
        pytest.skip("shared/data/truthfulqa not found")
    rows = (data_dir / "truthfulqa" / "lofit_splits" / "fold_0_test_seed_42.jsonl").read_text().splitlines()
    records = []
    for row in map(json.loads, rows[:4]):
        records.append(
            {
                "question": row["Question"],
                "best_answer": row["Best Answer"],
                "correct_answers": row["Correct Answers"].split(";"),
                "incorrect_answers": row["Incorrect Answers"].split(";"),
            }
        )
    model, tokenizer = adapted("llama"), tiny_tokenizer()
    tokens_fed = {"count": 0}

    def count_tokens(module, args, kwargs):
        tokens_fed["count"] += kwargs["input_ids"].numel()

    model.get_base_model().model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    results, seconds, tokens = {}, {"fast": float("inf"), "naive": float("inf")}, {}
    for scorer in ("fast", "naive", "fast"):  # fast: best of two (the first warms up)
        tokens_fed["count"] = 0
        start = time.perf_counter()
        results[scorer] = evaluate(  # max_length: the prompt is longer than the tiny model's 128 positions
            model, tokenizer, "truthfulqa_mc", records, scorer=scorer, progress=False, max_length=4096
        )
        seconds[scorer] = min(seconds[scorer], time.perf_counter() - start)
        tokens[scorer] = tokens_fed["count"]
    ratio = seconds["naive"] / seconds["fast"]
    print(
        f"truthfulqa_mc, 4 questions, tiny llama: naive {seconds['naive']:.2f}s {tokens['naive']} tokens, "
        f"fast {seconds['fast']:.2f}s {tokens['fast']} tokens: x{ratio:.1f}"
    )
    assert results["fast"] == pytest.approx(results["naive"], abs=1e-6)
    assert tokens["naive"] > 5 * tokens["fast"]
    assert ratio > 1.5


def test_a_model_whose_logits_are_more_than_the_head_keeps_full_logits():
    """split_model checks body + head against the model's own logits; a mismatch (here: a soft-cap the
    model's forward does not apply) falls back to full logits, with the same scores as the naive path."""
    from lofit.evaluation.forward import split_model

    model, tokenizer = adapted("llama"), tiny_tokenizer()
    assert split_model(model, [5, 6, 7]) is not None
    model.get_base_model().config.final_logit_softcapping = 0.5
    assert split_model(model, [5, 6, 7]) is None
    requests = [ScoringRequest("Q: why?\nA:", [" because.", " no"]), ScoringRequest("Q: how?", [" so", "!"])]
    naive = score_continuations(model, tokenizer, requests, scorer="naive", progress=False)
    fast = score_continuations(model, tokenizer, requests, scorer="fast", progress=False)
    for a, b in zip(naive, fast, strict=True):
        assert b == pytest.approx(a, abs=1e-4)
