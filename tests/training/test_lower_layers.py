"""`train_offsets(..., cache_lower_layers=True)`: later epochs start at the lowest adapted layer from cached
hidden states, with the same losses, validation losses and trained offsets as the full forward (fp32)."""

from __future__ import annotations

import pytest
import torch

from lofit.errors import LofitValueError
from lofit.training.lower_layers import check_cache_fits
from lofit.training.offsets import train_offsets
from tiny_models import tiny_model, tiny_tokenizer

RECORDS = [
    {"prompt": f"{a}+{b}=", "completion": f"{a + b}" + "!" * (a * b)} for a in range(4) for b in range(3)
]
PAIRS = [
    {"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"][::-1] + "?"}
    for r in RECORDS
]
OPTIONS = {"epochs": 3, "batch_size": 4, "lr": 0.05, "progress": False, "precision": "fp32"}
HEADS = {1: [0, 2], 2: [1]}  # nothing in layer 0: layer 0 runs only in the first epoch


def run(model_type: str, data, objective: str, cache: bool, heads=HEADS):  # type: ignore[no-untyped-def]
    model = train_offsets(
        tiny_model(model_type), tiny_tokenizer(), data, heads, objective=objective, val_data=data[:5],
        cache_lower_layers=cache, **OPTIONS,
    )  # fmt: skip
    return [p.detach().clone() for p in model.adapter_parameters()], model.training_history


@pytest.mark.parametrize(
    ("model_type", "objective"), [("llama", "sft"), ("gpt2", "sft"), ("llama", "dpo"), ("gemma2", "dpo")]
)
def test_cached_lower_layers_give_the_same_losses_and_offsets(model_type: str, objective: str) -> None:
    data = PAIRS if objective == "dpo" else RECORDS
    plain_offsets, plain = run(model_type, data, objective, cache=False)
    cached_offsets, cached = run(model_type, data, objective, cache=True)
    summary = cached.summary["lower_layer_cache"]
    assert summary["layer"] == 1 and summary["replayed_forwards"] > 0
    assert summary["sequences"] == len({s.input_ids for s in _sequences(data, objective)})
    assert "lower_layer_cache" not in plain.summary
    assert cached.losses() == pytest.approx(plain.losses(), abs=1e-5)
    val = [v["val_loss"] for v in plain.validation]
    assert [v["val_loss"] for v in cached.validation] == pytest.approx(val, abs=1e-5)
    for a, b in zip(plain_offsets, cached_offsets, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def _sequences(data, objective):  # type: ignore[no-untyped-def]
    from lofit.training.losses import make_objective

    task = make_objective(objective, tiny_tokenizer())
    return [s for e in task.encode(data) for s in e.sequences]


def test_no_cache_when_an_adapted_head_sits_in_layer_0() -> None:
    _, history = run("llama", RECORDS, "sft", cache=True, heads={0: [1], 2: [0]})
    assert "lower_layer_cache" not in history.summary


def test_a_cache_that_would_not_fit_is_refused_with_what_to_change() -> None:
    from lofit.training.losses import make_objective

    examples = make_objective("sft", tiny_tokenizer()).encode(RECORDS)
    with pytest.raises(LofitValueError, match="pass cache_lower_layers=False"):
        check_cache_fits(examples, hidden_size=32, limit=1000)
    check_cache_fits(examples, hidden_size=32)  # the default limit holds this easily


def test_cache_and_activation_checkpointing_together() -> None:
    def offsets(cache: bool) -> list[torch.Tensor]:
        model = train_offsets(
            tiny_model("llama"), tiny_tokenizer(), RECORDS, HEADS, cache_lower_layers=cache,
            gradient_checkpointing=True, **OPTIONS,
        )  # fmt: skip
        assert ("lower_layer_cache" in model.training_history.summary) is cache
        return [p.detach() for p in model.adapter_parameters()]

    for a, b in zip(offsets(False), offsets(True), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_auto_caches_when_it_fits_and_trains_without_the_cache_when_not(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import lofit.training.loop as loop

    plain_offsets, _ = run("llama", RECORDS, "sft", cache=False)
    auto_offsets, auto = run("llama", RECORDS, "sft", cache="auto")  # type: ignore[arg-type]
    assert auto.summary["lower_layer_cache"]["replayed_forwards"] > 0
    monkeypatch.setattr(loop, "MAX_CACHE_BYTES", 1000)
    small_offsets, small = run("llama", RECORDS, "sft", cache="auto")  # type: ignore[arg-type]
    assert "lower_layer_cache" not in small.summary
    assert "more than" in small.settings["lower_layer_cache_off"]
    for a, b, c in zip(plain_offsets, auto_offsets, small_offsets, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0) and torch.equal(a, c)


@pytest.mark.parametrize("value", ["yes", 1.5, None])
def test_a_bad_cache_lower_layers_value_is_refused(value) -> None:  # type: ignore[no-untyped-def]
    from lofit.training import TrainingConfig

    with pytest.raises(LofitValueError, match="cache_lower_layers must be True, False or 'auto'"):
        TrainingConfig(cache_lower_layers=value)


def test_the_cli_caches_in_offset_training_by_default_and_never_in_selection(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lofit.cli.options import RunOptions
    from lofit.cli.steps import training_kwargs

    options = RunOptions(task="generic", out=tmp_path / "o")
    assert training_kwargs(options, {}, "train")["cache_lower_layers"] == "auto"
    assert "cache_lower_layers" not in training_kwargs(options, {}, "select")
    for flag, value in (("on", True), ("off", False)):
        chosen = RunOptions(task="generic", out=tmp_path / "o", cache_lower_layers=flag)
        assert training_kwargs(chosen, {}, "train")["cache_lower_layers"] is value
    with pytest.raises(LofitValueError, match="--cache-lower-layers sometimes: choose one of auto, on, off"):
        RunOptions(task="generic", out=tmp_path / "o", cache_lower_layers="sometimes")


def test_the_cli_flag_reaches_the_options_and_a_bad_value_exits_2(capsys) -> None:  # type: ignore[no-untyped-def]
    from lofit.cli.main import build_parser

    parser = build_parser()
    for command in (["run"], ["train", "--heads", "heads.json"]):
        common = [*command, "--task", "mquake", "--out", "o"]
        assert parser.parse_args([*common, "--cache-lower-layers", "off"]).cache_lower_layers == "off"
        assert parser.parse_args(common).cache_lower_layers == "auto"
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["run", "--task", "mquake", "--out", "o", "--cache-lower-layers", "maybe"])
    assert exited.value.code == 2 and "--cache-lower-layers" in capsys.readouterr().err
