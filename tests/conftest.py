"""Fixtures every test shares."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def no_base_evaluation_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never write base-evaluation cache entries into the user's ~/.cache/lofit.

    The tests of the cache itself opt back in (`monkeypatch.delenv("LOFIT_EVAL_CACHE")`) and point it at a
    temporary folder.
    """
    monkeypatch.setenv("LOFIT_EVAL_CACHE", "off")
