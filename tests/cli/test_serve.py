"""`lofit serve`: vLLM's flags pass through; without vLLM a message names the extra to install."""

from __future__ import annotations

import importlib.util

import pytest

from lofit.cli.main import build_parser, main


def test_vllms_own_flags_pass_through_only_for_serve() -> None:
    args, unknown = build_parser().parse_known_args(
        ["serve", "--model", "m", "--adapter", "a=/x", "--port", "8001", "--max-model-len", "64"]
    )
    assert (args.model, args.adapter, unknown) == ("m", ["a=/x"], ["--port", "8001", "--max-model-len", "64"])
    with pytest.raises(SystemExit):
        main(["merge", "--adapter", "a", "--out", "o", "--port", "8001"])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_serve_without_vllm_names_the_extra(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", "m", "--adapter", "a=/x"]) == 2
    assert "pip install 'lofit[vllm]'" in capsys.readouterr().err
