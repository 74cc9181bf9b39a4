"""Selectors as a registry: one module and one signature each; `select_heads` reads the table."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import torch

import lofit.selection
from lofit.errors import LofitValueError
from lofit.selection import selectors
from lofit.selection.select import select_heads
from lofit.selection.selectors import METHODS, SELECTORS, SelectionRequest, Selector, SelectorScores
from tiny_models import tiny_model, tiny_tokenizer

RECORDS = [{"prompt": "Q: 2+2 A:", "completion": " 4"}, {"prompt": "Q: 1+2 A:", "completion": " 3"}]


@pytest.mark.parametrize("method", METHODS)
def test_every_selector_is_one_module_with_the_one_signature(method: str) -> None:
    module = importlib.import_module(f"lofit.selection.{SELECTORS[method].module}")
    assert Path(module.__file__ or "").parent == Path(lofit.selection.__file__).parent
    signature = inspect.signature(module.select)
    assert list(signature.parameters) == ["request"]
    assert signature.parameters["request"].annotation in ("SelectionRequest", SelectionRequest)
    assert signature.return_annotation in ("SelectorScores", SelectorScores)


def test_a_new_selector_is_one_table_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry pointing at a module is all `select_heads` needs (here the "random" module under a new name)."""
    monkeypatch.setitem(SELECTORS, "shuffled", Selector("random", "a test selector"))
    selection = select_heads(tiny_model("llama"), tiny_tokenizer(), RECORDS, method="shuffled", seed=3)
    expected = select_heads(tiny_model("llama"), tiny_tokenizer(), RECORDS, method="random", seed=3)
    assert selection.method == "shuffled" and selection.metadata["score"] == "a test selector"
    assert torch.equal(selection.scores, expected.scores) and selection.ranking == expected.ranking


def test_select_heads_passes_the_request_and_ranks_with_the_tiebreak(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[SelectionRequest] = []

    def select(request: SelectionRequest) -> SelectorScores:
        seen.append(request)
        request.metadata["mine"] = 1
        shape = (request.geometry.num_layers, request.geometry.num_heads)
        tiebreak = torch.arange(shape[0] * shape[1], dtype=torch.float32).flip(0).view(shape)
        return SelectorScores(torch.ones(shape), tiebreak=tiebreak, history={"epochs": []})

    monkeypatch.setitem(SELECTORS, "flat", Selector("flat", "all equal"))
    monkeypatch.setattr(selectors, "load_selector", lambda method: select)
    monkeypatch.setattr(
        importlib.import_module("lofit.selection.select"), "load_selector", lambda method: select
    )
    selection = select_heads(tiny_model("llama"), tiny_tokenizer(), RECORDS, method="flat", probe_l2=2.0)
    request = seen[0]
    assert request.probe_l2 == 2.0 and request.objective == "sft" and request.records == RECORDS
    assert selection.metadata["mine"] == 1 and selection.history == {"epochs": []}
    last = (request.geometry.num_layers - 1, request.geometry.num_heads - 1)
    assert selection.ranking[0] == last  # equal scores: the lowest tiebreak (the last head) first


def test_an_unknown_method_names_the_table() -> None:
    with pytest.raises(LofitValueError, match=r"method must be one of \['lofit', 'random', 'probe'"):
        select_heads(tiny_model("llama"), tiny_tokenizer(), RECORDS, method="best")
