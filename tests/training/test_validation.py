"""Training's Python entry points validate their arguments as the CLI does, refuse records no tokenizer
takes, bound every text before tokenising, and refuse training in which every completion is cut.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import pytest
import torch

from lofit.errors import LofitError
from lofit.selection.select import select_heads
from lofit.training.encoding import CHARS_PER_TOKEN, SequenceEncoder
from lofit.training.offsets import train_offsets
from tiny_models import tiny_model, tiny_tokenizer

TOKENIZER = tiny_tokenizer()
SFT = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(4)]
DPO = [{"prompt": f"{a}?", "chosen": "yes", "rejected": "no"} for a in range(4)]
FAST = {"epochs": 1, "batch_size": 2, "progress": False}


def _train(
    model: object = "MODEL", tokenizer: object = TOKENIZER, data: object = SFT, **kwargs: object
) -> object:
    model = tiny_model("llama") if model == "MODEL" else model
    return train_offsets(model, tokenizer, data, {0: [0]}, **{**FAST, **kwargs})  # type: ignore[arg-type]


def _select(model: object = "MODEL", tokenizer: object = TOKENIZER, data: object = SFT) -> object:
    model = tiny_model("llama") if model == "MODEL" else model
    return select_heads(model, tokenizer, data, **FAST)  # type: ignore[arg-type]


BAD_CALLS: dict[str, tuple[Callable[[], object], str]] = {
    "train_offsets(model, None)": (lambda: _train(tokenizer=None), "tokenizer must be .*got NoneType"),
    "train_offsets(None, tokenizer)": (lambda: _train(model=None), r"train_offsets\(\) needs .*got NoneType"),
    "train_offsets('gpt2', tokenizer)": (
        lambda: _train(model="gpt2"),
        "AutoModelForCausalLM.from_pretrained",
    ),
    "train_offsets(model, 'gpt2')": (lambda: _train(tokenizer="gpt2"), "tokenizer must be"),
    "select_heads(model, None)": (lambda: _select(tokenizer=None), "tokenizer must be"),
    "select_heads(None, tokenizer)": (lambda: _select(model=None), r"select_heads\(\) needs"),
    "a NUL byte in a completion": (
        lambda: _train(data=[*SFT, {"prompt": "a", "completion": "b\x00"}]),
        "train_data, index 4, field 'completion': holds a NUL byte",
    ),
    "a lone surrogate in a prompt": (
        lambda: _train(data=[{"prompt": "\ud800", "completion": "b"}]),
        "lone UTF-16 surrogate",
    ),
    "a lone surrogate in a validation record": (
        lambda: _train(val_data=[{"prompt": "a", "completion": "\udfff"}]),
        "val_data, index 0",
    ),
    "a DPO pair of one response": (
        lambda: _train(data=[*DPO, {"prompt": "p", "chosen": "same", "rejected": "same"}], objective="dpo"),
        "same text as 'chosen'",
    ),
    "every SFT completion cut (max_length 3)": (
        lambda: _train(data=[{"prompt": "abcdef", "completion": "ghijklmnop"}] * 4, max_length=3),
        "every one of the 4 sequences .* longest sequence has 17 tokens",
    ),
    "every DPO response cut (max_length 4)": (
        lambda: _train(
            data=[{"prompt": "ab", "chosen": "c" * 20, "rejected": "d" * 20}] * 2,
            objective="dpo",
            max_length=4,
        ),
        "every one of the 4 sequences",
    ),
}


@pytest.mark.parametrize("call", list(BAD_CALLS), ids=list(BAD_CALLS))
def test_bad_training_call(call: str) -> None:
    run, message = BAD_CALLS[call]
    with pytest.raises(LofitError, match=message):
        run()


def test_the_base_model_comes_back_unchanged_after_a_refusal() -> None:
    base = tiny_model("llama")
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    with pytest.raises(LofitError):
        _train(model=base, data=[{"prompt": "abcdef", "completion": "ghijklmnop"}] * 4, max_length=3)
    assert not any("lofit" in name for name, _ in base.named_modules())
    assert all(torch.equal(before[name], p) for name, p in base.named_parameters())


def test_some_completions_cut_is_a_warning_that_says_how_much() -> None:
    data = [*SFT, {"prompt": "ab", "completion": "c" * 30}]
    with pytest.warns(
        UserWarning,
        match=r"1 of 5 sequences exceed max_length=12 tokens and were truncated by up to 21 tokens",
    ):
        _train(data=data, max_length=12)


def test_prompt_cut_only_is_a_warning() -> None:
    data = [*SFT, {"prompt": "x" * 50, "completion": "4"}]
    with pytest.warns(UserWarning, match="prompt cut from the left"):
        _train(data=data, max_length=12)


@pytest.mark.parametrize("field", ["prompt", "response"])
def test_huge_text_is_bounded_before_tokenising(field: str) -> None:
    """A 10 MB prompt (or response) is cut to CHARS_PER_TOKEN x max_length characters first."""
    encoder = SequenceEncoder(TOKENIZER, max_length=64)
    huge = "ab " * 3_400_000
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prompt, response = (huge, "c") if field == "prompt" else ("a", huge)
        sequence = encoder.encode(prompt, response)
    assert time.perf_counter() - start < 10
    assert len(sequence.input_ids) == 64
    assert encoder.longest <= 2 * CHARS_PER_TOKEN * 64 + 1  # tokenised only the bounded text


@pytest.mark.parametrize("field", ["prompt", "response"])
def test_huge_text_without_max_length_is_bounded_by_the_models_positions(field: str) -> None:
    """No max_length: a 10 MB text is cut to CHARS_PER_TOKEN x the model's positions before tokenising."""
    encoder = SequenceEncoder(TOKENIZER, max_positions=128)
    huge = "ab " * 3_400_000
    start = time.perf_counter()
    prompt, response = (huge, "c") if field == "prompt" else ("a", huge)
    sequence = encoder.encode(prompt, response)
    assert time.perf_counter() - start < 10
    assert encoder.num_text_cut == 1 and encoder.most_chars_cut == len(huge) - CHARS_PER_TOKEN * 128
    assert len(sequence.input_ids) <= 2 * CHARS_PER_TOKEN * 128 + 2  # tokenised only the bounded text


def test_training_without_max_length_warns_how_much_text_was_cut_then_names_the_option() -> None:
    """The cut bounds memory; a text still longer than the model's positions is refused, naming max_length."""
    model = tiny_model("llama")
    positions = model.config.max_position_embeddings
    data = [*SFT, {"prompt": "x " * (CHARS_PER_TOKEN * positions), "completion": "4"}]
    warning = (
        rf"1 training text\(s\) longer than {CHARS_PER_TOKEN} characters per position of the model "
        rf"\({positions}\) were cut before tokenising, by up to {CHARS_PER_TOKEN * positions} characters"
    )
    with pytest.warns(UserWarning, match=warning), pytest.raises(LofitError, match="pass max_length"):
        _train(model=model, data=data)


def test_texts_within_the_models_positions_are_not_cut() -> None:
    encoder = SequenceEncoder(TOKENIZER, max_positions=128)
    encoder.encode("a" * (CHARS_PER_TOKEN * 128), "b")
    assert encoder.num_text_cut == 0
