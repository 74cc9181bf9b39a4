"""The examples in the adapter layer's docstrings run."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "lofit.adapters.base",
    "lofit.adapters.architectures",
    "lofit.adapters.config",
    "lofit.integrations.export",
    "lofit.integrations.gguf",
    "lofit.adapters.heads",
    "lofit.adapters.layer",
    "lofit.adapters.lm_head",
    "lofit.adapters.folding",
    "lofit.adapters.merged",
    "lofit.adapters.mixed_batch",
    "lofit.adapters.composition",
    "lofit.adapters.model",
    "lofit.adapters.persistence",
    "lofit.adapters.wrappers",
    "lofit.baselines.red",
    "lofit.baselines.parameters",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_public_classes_have_examples() -> None:
    from lofit import LofitConfig, LofitModel
    from lofit.adapters.layer import HeadVectors, LofitProjection
    from lofit.baselines.red import RedConfig, RedModel, RedProjection

    for cls in (LofitConfig, LofitModel, RedConfig, RedModel, RedProjection, HeadVectors, LofitProjection):
        assert ">>>" in (cls.__doc__ or ""), cls.__name__
