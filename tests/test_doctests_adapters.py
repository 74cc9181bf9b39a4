"""The examples in the adapter layer's docstrings run (issue 13 item 6)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "lofit.adapter_base",
    "lofit.architectures",
    "lofit.config",
    "lofit.export",
    "lofit.heads",
    "lofit.layer",
    "lofit.lm_head",
    "lofit.merge",
    "lofit.merged",
    "lofit.mixed_batch",
    "lofit.composition",
    "lofit.model",
    "lofit.persistence",
    "lofit.wrappers",
    "lofit.baselines.red",
    "lofit.baselines.parameters",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_public_classes_have_examples() -> None:
    from lofit import LofitConfig, LofitModel
    from lofit.baselines.red import RedConfig, RedModel, RedProjection
    from lofit.layer import HeadVectors, LofitProjection

    for cls in (LofitConfig, LofitModel, RedConfig, RedModel, RedProjection, HeadVectors, LofitProjection):
        assert ">>>" in (cls.__doc__ or ""), cls.__name__
