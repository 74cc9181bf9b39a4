"""Merged models are what their config says: the usual save_pretrained reloads without lofit.

The round trip runs `AutoModelForCausalLM.from_pretrained` in a fresh process that imports transformers
only, on every supported architecture, for LoFiT (scales and offsets) and RED.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lofit import LofitConfig, get_lofit_model
from lofit.adapters.folding import MergeError
from lofit.adapters.merged import llama_equivalence_problems
from lofit.baselines import get_red_model
from tiny_models import ARCHITECTURES, VOCAB, tiny_config, tiny_model

HEADS = {0: [0, 2], 2: [1, 3]}
IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))

RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
rows = {}
for directory in sys.argv[1:]:
    model, info = AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", output_loading_info=True
    )
    data = torch.load(directory + "/expected.pt")
    with torch.no_grad():
        logits = model.eval()(input_ids=data["ids"]).logits
    rows[directory] = {
        "class": type(model).__name__,
        "max_diff": (logits - data["logits"]).abs().max().item(),
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": [str(m) for m in info["mismatched_keys"]],
    }
assert "lofit" not in sys.modules
print(json.dumps(rows))
"""


def _base(arch: str, **overrides: object) -> torch.nn.Module:
    if not overrides:
        return tiny_model(arch, 0)
    config = tiny_config(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _save_merged(adapter_model: torch.nn.Module, directory: Path) -> str:
    expected = _logits(adapter_model)
    merged = adapter_model.merge_and_unload()
    assert (_logits(merged) - expected).abs().max().item() <= 1e-5
    merged.save_pretrained(directory)  # the usual call, nothing lofit-specific
    torch.save({"ids": IDS, "logits": expected}, directory / "expected.pt")
    return str(directory)


def _reload_without_lofit(directories: list[str]) -> dict[str, dict[str, object]]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", RELOAD, *directories], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows: dict[str, dict[str, object]] = json.loads(result.stdout.strip().splitlines()[-1])
    return rows


def test_merged_save_pretrained_round_trips_without_lofit(tmp_path: Path) -> None:
    cases: dict[str, torch.nn.Module] = {}
    for arch in ARCHITECTURES:
        config = LofitConfig(heads=HEADS, use_scale=True, use_offset=True, init_std=0.3)
        cases[f"lofit-{arch}"] = get_lofit_model(_base(arch), config)
    for arch in ("llama", "mistral", "phi3", "gpt2"):
        red = get_red_model(_base(arch))
        with torch.no_grad():
            for param in red.red_parameters():
                param.normal_(0.0, 0.3)
        cases[f"red-{arch}"] = red
    # RED(Half): only some layers edited, so only their projections gain the merged bias
    half = get_red_model(_base("llama"), layers=[1])
    with torch.no_grad():
        for param in half.red_parameters():
            param.normal_(0.0, 0.3)
    cases["red-llama-half"] = half
    # Conversion details: tied embeddings, a non-default rope theta.
    tied = get_lofit_model(_base("qwen2", tie_word_embeddings=True), LofitConfig(heads=HEADS, init_std=0.3))
    cases["lofit-qwen2-tied"] = tied
    directories = {name: _save_merged(model, tmp_path / name) for name, model in cases.items()}
    rows = _reload_without_lofit(list(directories.values()))
    print("\ncase | reloaded class | max |logit diff| | missing | unexpected")
    for name, directory in directories.items():
        row = rows[directory]
        print(f"{name} | {row['class']} | {row['max_diff']:.2e} | {row['missing']} | {row['unexpected']}")
        assert row["missing"] == [] and row["unexpected"] == [] and row["mismatched"] == [], (name, row)
        assert row["max_diff"] <= 1e-5, (name, row)
        if name.split("-")[1] in ("mistral", "qwen2", "phi3"):
            assert row["class"] == "LlamaForCausalLM"


def test_gemma3_text_merged_round_trips_without_lofit(tmp_path: Path) -> None:
    """Gemma 3 (the bundled gemma3-270m's architecture): merged offsets reload in plain transformers."""
    config = LofitConfig(heads=HEADS, use_scale=True, use_offset=True, init_std=0.3)
    directory = _save_merged(get_lofit_model(_base("gemma3_text"), config), tmp_path / "gemma3")
    row = _reload_without_lofit([directory])[directory]
    assert row["missing"] == [] and row["unexpected"] == [] and row["mismatched"] == [], row
    assert row["max_diff"] <= 1e-5, row


@pytest.mark.parametrize(
    ("arch", "overrides", "message"),
    [
        ("mistral", {"sliding_window": 4}, "sliding-window"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}, "sliding"),
        ("phi3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_inexact_llama_equivalents_are_refused_before_any_change(
    arch: str, overrides: dict[str, object], message: str
) -> None:
    base = _base(arch, **overrides)
    if arch == "phi3":  # Phi-3 reads it from rope_parameters
        base.config.rope_parameters["partial_rotary_factor"] = 0.5
    assert llama_equivalence_problems(base.config)
    model = get_lofit_model(base, LofitConfig(heads=HEADS, init_std=0.3))
    before = _logits(model)
    weights = [p.clone() for p in model.get_base_model().parameters()]
    with pytest.raises(MergeError, match=message):
        model.merge_and_unload()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.get_base_model().parameters(), strict=True))
    assert torch.equal(_logits(model), before)  # still the wrapped, adapted model
    # Scales alone need no bias: those merge into the model's own class.
    scales = get_lofit_model(
        _base(arch, **overrides), LofitConfig(heads=HEADS, use_offset=False, use_scale=True)
    )
    assert type(scales.merge_and_unload()).__name__ == type(base).__name__


def test_merged_model_config_and_weights_agree_for_every_architecture() -> None:
    for arch in ARCHITECTURES:
        merged = get_lofit_model(_base(arch), LofitConfig(heads=HEADS, init_std=0.3)).merge_and_unload()
        fresh = AutoModelForCausalLM.from_config(merged.config)
        assert set(merged.state_dict()) == set(fresh.state_dict()), arch
        # A checkpoint of the merged model loads back into it (implicit zero biases included).
        merged.load_state_dict(fresh.state_dict() | merged.state_dict())
