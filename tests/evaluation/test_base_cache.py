"""The base-evaluation cache: hits only for the same base, data and protocol; safe writes; no non-finite entries."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from lofit.evaluation import evaluate
from lofit.evaluation.base_cache import BaseEvalCache, cache_key
from tiny_models import tiny_model, tiny_tokenizer

RECORDS = [
    {"question": "2+2=", "choices": ["4", "5"], "answer": 0},
    {"question": "Sky is", "choices": [" blue", " green", " red"], "answer": 0},
]
OPTIONS = {"batch_size": 4, "progress": False}


@pytest.fixture(autouse=True)
def cache_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/conftest.py turns the cache off for every other test; these test it."""
    monkeypatch.delenv("LOFIT_EVAL_CACHE", raising=False)


def _evaluation(model: torch.nn.Module) -> tuple[dict[str, float], list[dict]]:
    return evaluate(model, tiny_tokenizer(), "mc", RECORDS, return_details=True, **OPTIONS)


def test_round_trip_gives_the_same_numbers(tmp_path: Path) -> None:
    model = tiny_model("llama")
    first = BaseEvalCache.open(model, RECORDS, "mc", OPTIONS, cache_dir=tmp_path)
    assert first.load() is None and first.status == "miss"
    evaluation = _evaluation(model)
    first.store(evaluation)
    assert first.status.startswith("stored ") and first.path is not None and first.path.is_file()
    second = BaseEvalCache.open(model, RECORDS, "mc", OPTIONS | {"progress": True}, cache_dir=tmp_path)
    loaded = second.load()
    assert second.status.startswith("hit ")
    assert loaded is not None and loaded[0] == evaluation[0]
    assert [d["scores"] for d in loaded[1]] == [d["scores"] for d in evaluation[1]]


def test_key_changes_with_weights_data_protocol_and_dtype() -> None:
    model = tiny_model("llama")
    key = cache_key(model, RECORDS, "mc", OPTIONS)
    assert key == cache_key(tiny_model("llama"), RECORDS, "mc", OPTIONS)  # same seed, same weights
    assert key != cache_key(model, RECORDS[:1], "mc", OPTIONS)
    assert key != cache_key(model, RECORDS, "mc", OPTIONS | {"batch_size": 8})
    assert key != cache_key(model, RECORDS, "mc", OPTIONS | {"precision": "bf16"})  # autocast scores differ
    assert key != cache_key(model, RECORDS, "mc", OPTIONS | {"choice_template": "{choice}"})
    changed = tiny_model("llama")
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    assert key != cache_key(changed, RECORDS, "mc", OPTIONS)
    assert key != cache_key(tiny_model("llama").to(torch.float64), RECORDS, "mc", OPTIONS)


def test_non_finite_evaluations_are_never_stored(tmp_path: Path) -> None:
    model = tiny_model("llama")
    cache = BaseEvalCache.open(model, RECORDS, "mc", OPTIONS, cache_dir=tmp_path)
    metrics, details = _evaluation(model)
    cache.store(({**metrics, "accuracy": math.nan}, details))
    assert cache.status.startswith("not stored") and cache.path is not None and not cache.path.exists()
    details[1]["scores"][0] = -math.inf
    cache.store((metrics, details))
    assert cache.status.startswith("not stored") and not cache.path.exists()


def test_a_tampered_or_foreign_entry_is_ignored(tmp_path: Path) -> None:
    model = tiny_model("llama")
    cache = BaseEvalCache.open(model, RECORDS, "mc", OPTIONS, cache_dir=tmp_path)
    cache.store(_evaluation(model))
    assert cache.path is not None
    entry = json.loads(cache.path.read_text())
    for broken in (
        {**entry, "key": "0" * 64},
        {**entry, "metrics": {"accuracy": "NaN"}},
        {**entry, "details": entry["details"][:1]},
        {**entry, "details": [{**entry["details"][0], "question": "other"}, entry["details"][1]]},
    ):
        cache.path.write_text(json.dumps(broken))
        fresh = BaseEvalCache.open(model, RECORDS, "mc", OPTIONS, cache_dir=tmp_path)
        assert fresh.load() is None and fresh.status.startswith("miss")
    cache.path.write_text("{not json")
    fresh = BaseEvalCache.open(model, RECORDS, "mc", OPTIONS, cache_dir=tmp_path)
    assert fresh.load() is None and "unreadable" in fresh.status


def test_links_are_never_followed(tmp_path: Path) -> None:
    model = tiny_model("llama")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "root-link").symlink_to(elsewhere, target_is_directory=True)
    cache = BaseEvalCache.open(model, RECORDS, "mc", OPTIONS, cache_dir=tmp_path / "root-link")
    assert cache.status.startswith("off:") and "symbolic link" in cache.status
    cache.store(_evaluation(model))
    assert list(elsewhere.iterdir()) == []

    root = tmp_path / "root"
    root.mkdir()
    (root / "base-eval").symlink_to(elsewhere, target_is_directory=True)
    assert BaseEvalCache.open(model, RECORDS, "mc", OPTIONS, cache_dir=root).status.startswith("off:")

    real_root = tmp_path / "real"
    good = BaseEvalCache.open(model, RECORDS, "mc", OPTIONS, cache_dir=real_root)
    good.store(_evaluation(model))
    assert good.path is not None
    target = elsewhere / "entry.json"
    os.replace(good.path, target)
    good.path.symlink_to(target)  # an entry that is a link is neither read nor replaced
    again = BaseEvalCache.open(model, RECORDS, "mc", OPTIONS, cache_dir=real_root)
    assert again.load() is None and again.status.startswith("off:")
    again.store(_evaluation(model))
    assert again.status.startswith("not stored") and good.path.is_symlink()


def test_switched_off_by_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOFIT_EVAL_CACHE", "off")
    cache = BaseEvalCache.open(tiny_model("llama"), RECORDS, "mc", OPTIONS, cache_dir=tmp_path)
    assert cache.load() is None and cache.status == "off: LOFIT_EVAL_CACHE=off"
    cache.store(_evaluation(tiny_model("llama")))
    assert list(tmp_path.iterdir()) == []
