"""Evaluation refuses to report a metric computed from non-finite logits, bounds every input before
tokenising (with a warning that says how much was cut), and validates its Python arguments.

Categories: non-finite logits (`test_no_metric_from_non_finite_logits`), over-long inputs
(`test_long_input_is_cut_with_a_warning`, `test_huge_input_stays_bounded`), bad arguments and texts
(`test_bad_evaluate_call`).
"""

from __future__ import annotations

import time
import tracemalloc
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lofit import LofitConfig, get_lofit_model
from lofit.errors import LofitError
from lofit.evaluation import ScoringRequest, evaluate, score_continuations
from lofit.evaluation.bounds import CHARS_PER_TOKEN, NonFiniteLogitsError, model_max_positions
from tiny_models import tiny_model, tiny_tokenizer

TOKENIZER = tiny_tokenizer()
MC = [{"question": "2+2=", "choices": ["4", "5"], "answer": 0}]
TQA = [
    {
        "question": "Is the earth flat?",
        "best_answer": "No.",
        "correct_answers": ["No."],
        "incorrect_answers": ["Yes."],
    }
]
EM = [{"prompt": "1+1=", "answers": ["2"]}]
TASK_DATA = {"mc": MC, "truthfulqa_mc": TQA, "exact_match": EM}
OPTIONS: dict[str, dict[str, object]] = {
    "mc": {},
    "truthfulqa_mc": {"instruction": "", "primer": ""},
    "exact_match": {"max_new_tokens": 3},
}


def _nan_embeddings(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))
    return model


def _inf_adapter() -> nn.Module:
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads={1: [0]}), "broken")
    with torch.no_grad():
        model.adapter_parameters()[0].fill_(float("inf"))
    return model


def _inf_logits(model: nn.Module) -> nn.Module:
    model.get_output_embeddings().register_forward_hook(lambda module, args, output: output * float("inf"))
    return model


def _fp16_overflow() -> nn.Module:
    model = tiny_model("llama").half()
    with torch.no_grad():
        model.lm_head.weight.fill_(60000.0)
    return model


BROKEN_MODELS: dict[str, Callable[[], nn.Module]] = {
    "NaN embeddings": lambda: _nan_embeddings(tiny_model("llama")),
    "NaN embeddings (gpt2)": lambda: _nan_embeddings(tiny_model("gpt2")),
    "an adapter of inf offsets": _inf_adapter,
    "inf logits": lambda: _inf_logits(tiny_model("llama")),
    "fp16 logits that overflow": _fp16_overflow,
}


@pytest.mark.parametrize("task", list(TASK_DATA))
@pytest.mark.parametrize("broken", list(BROKEN_MODELS))
def test_no_metric_from_non_finite_logits(task: str, broken: str) -> None:
    model = BROKEN_MODELS[broken]()
    with pytest.raises(NonFiniteLogitsError, match="NaN/inf logits") as error:
        evaluate(model, TOKENIZER, task, TASK_DATA[task], progress=False, **OPTIONS[task])
    if broken == "an adapter of inf offsets":
        assert "the adapter 'broken'" in str(error.value)  # the message names the adapter
    else:
        assert "the model " in str(error.value)


@pytest.mark.parametrize("scorer", ["fast", "naive"])
def test_both_scorers_refuse_non_finite_logits(scorer: str) -> None:
    with pytest.raises(NonFiniteLogitsError):
        score_continuations(
            _nan_embeddings(tiny_model("llama")),
            TOKENIZER,
            [ScoringRequest("a", [" b", " c"])],
            scorer=scorer,  # type: ignore[arg-type]
            progress=False,
        )


def test_a_finite_model_still_scores_as_before() -> None:
    model = tiny_model("llama")
    scores = score_continuations(model, TOKENIZER, [ScoringRequest("ab", [" c"])], progress=False)
    ids = TOKENIZER("ab c")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    # " c" is two characters, at positions 2 and 3, predicted from positions 1 and 2
    oracle = torch.log_softmax(logits.float(), -1)[torch.arange(1, 3), torch.tensor(ids[2:4])].sum()
    assert scores[0][0] == pytest.approx(float(oracle), abs=1e-4)


# ------------------------------------------------------------------------------ long inputs
def _long(task: str, chars: int) -> list[dict[str, object]]:
    text = "ab " * (chars // 3)
    if task == "mc":
        return [{"question": text, "choices": ["x", "y"], "answer": 0}]
    if task == "truthfulqa_mc":
        return [{**TQA[0], "question": text}]
    return [{"prompt": text, "answers": ["2"]}]


@pytest.mark.parametrize("task", list(TASK_DATA))
@pytest.mark.parametrize(
    ("model_type", "chars", "max_length"),
    [("llama", 200_000, None), ("gpt2", 200_000, None), ("llama", 300, None), ("llama", 300, 50)],
    ids=[
        "200k chars, 128-position llama",
        "200k chars, gpt2 (learned positions)",
        "300 chars",
        "max_length 50",
    ],
)
def test_long_input_is_cut_with_a_warning(
    task: str, model_type: str, chars: int, max_length: int | None
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = evaluate(
            tiny_model(model_type), TOKENIZER, task, _long(task, chars), progress=False,
            max_length=max_length, **OPTIONS[task],
        )  # fmt: skip
    messages = [str(w.message) for w in caught if "were cut from the left" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    limit = max_length or 128 - (3 if task == "exact_match" else 0)
    assert f"longer than {limit} tokens" in messages[0]
    assert "tokens after" in messages[0]  # how much was cut
    if chars > CHARS_PER_TOKEN * limit:
        assert "characters before tokenising" in messages[0]
    assert all(0.0 <= value <= 1.0 for value in metrics.values())


def test_inputs_that_fit_are_not_cut() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        evaluate(tiny_model("llama"), TOKENIZER, "mc", MC, progress=False)


def test_model_max_positions() -> None:
    assert model_max_positions(tiny_model("llama")) == 128
    assert model_max_positions(tiny_model("gpt2")) == 128
    assert model_max_positions(get_lofit_model(tiny_model("opt"), LofitConfig())) == 128
    assert model_max_positions(nn.Linear(2, 2)) is None


@pytest.mark.parametrize("task", list(TASK_DATA))
def test_huge_input_stays_bounded(task: str) -> None:
    """A 10 MB single-line text: tokenised only as far as the model can see (was: 6.4 GB, > 5 minutes)."""
    records = _long(task, 10_000_000)
    tracemalloc.start()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate(tiny_model("llama"), TOKENIZER, task, records, progress=False, **OPTIONS[task])
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 30
    assert peak < 200 << 20  # Python-side allocations; the record itself (10 MB) is the caller's


def test_a_continuation_too_long_for_the_model_is_refused() -> None:
    with pytest.raises(LofitError, match="cannot fit in 128 tokens"):
        score_continuations(
            tiny_model("llama"), TOKENIZER, [ScoringRequest("a", [" b" * 5000])], progress=False
        )


# ----------------------------------------------------------------------------- bad arguments
BAD_EVALUATE: dict[str, tuple[tuple[object, ...], dict[str, object], str]] = {
    "model None": ((None, TOKENIZER, "mc", MC), {}, "got NoneType"),
    "model a name": (("gpt2", TOKENIZER, "mc", MC), {}, "got str"),
    "tokenizer None": (("MODEL", None, "mc", MC), {}, "tokenizer, got NoneType"),
    "task None": (("MODEL", TOKENIZER, None, MC), {}, "unknown task"),
    "data None": (("MODEL", TOKENIZER, "mc", None), {}, "data must be a list"),
    "data one record": (("MODEL", TOKENIZER, "mc", MC[0]), {}, "data must be a list"),
    "a record that is a string": (("MODEL", TOKENIZER, "mc", ["q"]), {}, "record 0 is a str"),
    "an unknown option": (("MODEL", TOKENIZER, "mc", MC), {"max_new_tokens": 3}, "unexpected keyword"),
    "max_length 1": (("MODEL", TOKENIZER, "mc", MC), {"max_length": 1}, "max_length must be"),
    "max_length '64'": (("MODEL", TOKENIZER, "mc", MC), {"max_length": "64"}, "max_length must be"),
    "a lone surrogate in a question": (
        ("MODEL", TOKENIZER, "mc", [{**MC[0], "question": "a\ud800"}]),
        {},
        r"lone UTF-16 surrogate \(U\+D800\)",
    ),
    "a lone surrogate in a choice": (
        ("MODEL", TOKENIZER, "mc", [{**MC[0], "choices": ["4", "\udfff"]}]),
        {},
        "field 'choices': holds a lone",
    ),
    "a NUL byte in a prompt": (
        ("MODEL", TOKENIZER, "exact_match", [{"prompt": "a\x00", "answers": ["b"]}]),
        {},
        "NUL",
    ),
    "a NUL byte in an answer": (
        ("MODEL", TOKENIZER, "truthfulqa_mc", [{**TQA[0], "incorrect_answers": ["Yes\x00"]}]),
        {"instruction": "", "primer": ""},
        "NUL byte",
    ),
    "max_new_tokens beyond the model": (
        ("MODEL", TOKENIZER, "exact_match", EM),
        {"max_new_tokens": 500},
        "fewer than the 500 new tokens",
    ),
}


@pytest.mark.parametrize("call", list(BAD_EVALUATE), ids=list(BAD_EVALUATE))
def test_bad_evaluate_call(call: str) -> None:
    args, kwargs, message = BAD_EVALUATE[call]
    args = tuple(tiny_model("llama") if a == "MODEL" else a for a in args)
    with pytest.raises(LofitError, match=message):
        evaluate(*args, progress=False, **kwargs)  # type: ignore[arg-type, call-overload]
