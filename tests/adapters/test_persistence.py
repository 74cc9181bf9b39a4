"""Saving and loading adapters: round trips, wrong base models and damaged files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lofit.adapters.persistence as persistence
from lofit import LofitConfig, LofitModel, get_lofit_model
from lofit.adapters.persistence import CONFIG_NAME, WEIGHTS_NAME
from lofit.errors import AdapterLoadError, BaseModelMismatchError
from tiny_models import VOCAB, tiny_model

HEADS = {0: [0, 2], 2: [1, 3]}


def input_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, use_scale=True, init_std=0.3))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_files_and_round_trip(saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", CONFIG_NAME, WEIGHTS_NAME]
    document = json.loads((saved / CONFIG_NAME).read_text())
    assert document["format"] == "lofit-adapter"
    assert document["adapter"]["heads"] == {"0": [0, 2], "2": [1, 3]}
    assert document["base_model"]["model_type"] == "llama"
    model = LofitModel.from_pretrained(tiny_model("llama"), saved)
    assert model.selected_heads() == HEADS
    assert model.lofit_config["default"].use_scale
    saved_again = saved.parent / "again"
    model.save_pretrained(saved_again)
    assert (saved_again / WEIGHTS_NAME).read_bytes() == (saved / WEIGHTS_NAME).read_bytes()


def test_same_base_in_bf16_is_accepted(saved: Path) -> None:
    model = LofitModel.from_pretrained(tiny_model("llama").to(torch.bfloat16), saved)
    assert all(p.dtype == torch.float32 for p in model.adapter_parameters())


@pytest.mark.parametrize(
    ("make_base", "message"),
    [
        (lambda: tiny_model("llama", seed=1), r"weights \(tensor model.embed_tokens.weight differs"),
        (
            lambda: tiny_model("mistral"),
            "trained for a llama model .* model_type=llama, but the base model given has model_type=mistral",
        ),
        (lambda: tiny_model("gemma"), "model_type=gemma"),
    ],
)
def test_wrong_base_model(saved: Path, make_base, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BaseModelMismatchError, match=message) as error:
        LofitModel.from_pretrained(make_base(), saved)
    assert str(saved / CONFIG_NAME) in str(error.value)
    # load_adapter refuses too and leaves the model as it was.
    model = get_lofit_model(tiny_model("llama", seed=1), LofitConfig(heads=HEADS))
    with pytest.raises(BaseModelMismatchError):
        model.load_adapter(saved, adapter_name="other")
    assert model.adapter_names == ["default"]


def test_already_merged_base_is_refused(tmp_path: Path) -> None:
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, init_std=0.3))  # offsets only
    model.save_pretrained(tmp_path / "a")
    merged = model.merge_and_unload()  # weights unchanged, biases added (and the config's switch turned on)
    with pytest.raises(BaseModelMismatchError, match=r"attention_bias|biases in layer 0"):
        LofitModel.from_pretrained(merged, tmp_path / "a")


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # truncated
        lambda data: data[:5],
        lambda data: b"\x00" * len(data),  # zeroed
        lambda data: b"not a safetensors file",
    ],
)
def test_corrupt_safetensors(saved: Path, damage) -> None:  # type: ignore[no-untyped-def]
    weights = saved / WEIGHTS_NAME
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(AdapterLoadError, match="corrupt or truncated") as error:
        LofitModel.from_pretrained(tiny_model("llama"), saved)
    assert str(weights) in str(error.value)


def test_tensors_not_matching_config(saved: Path) -> None:
    from safetensors.torch import load_file, save_file

    from lofit.adapters.persistence import unpack_vectors

    weights = saved / WEIGHTS_NAME
    tensors = unpack_vectors(load_file(str(weights)), weights)  # one tensor per layer (format 1 layout)
    for key, value, message in [
        ("layers.0.offset", torch.zeros(2, 5), "shape"),
        ("layers.0.offset", torch.full((2, 8), float("nan")), "NaN"),
        ("layers.0.heads", torch.tensor([0, 1]), "head indices of layer 0"),
    ]:
        save_file({**tensors, key: value}, str(weights))
        with pytest.raises(AdapterLoadError, match=message) as error:
            LofitModel.from_pretrained(tiny_model("llama"), saved)
        assert str(weights) in str(error.value)
    save_file({k: v for k, v in tensors.items() if k != "layers.2.scale"}, str(weights))
    with pytest.raises(AdapterLoadError, match=r"'layers\.2\.scale' is missing"):
        LofitModel.from_pretrained(tiny_model("llama"), saved)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda doc: "{not json", "not valid JSON"),
        (lambda doc: json.dumps([1, 2]), "not a LoFiT adapter config"),
        (lambda doc: json.dumps({**doc, "format": "peft"}), "not a LoFiT adapter config"),
        (lambda doc: json.dumps({**doc, "format_version": 99}), "format_version 99 is not supported"),
        (
            lambda doc: json.dumps({k: v for k, v in doc.items() if k != "base_model"}),
            "'base_model' is missing",
        ),
        (
            lambda doc: json.dumps({**doc, "adapter": {**doc["adapter"], "heads": [1, 2]}}),
            "heads must be a dict",
        ),
        (lambda doc: json.dumps({**doc, "adapter": {**doc["adapter"], "heads": {}}}), "lists no head"),
        (
            lambda doc: json.dumps({**doc, "adapter": {**doc["adapter"], "rank": 4}}),
            "unknown LofitConfig fields",
        ),
        (lambda doc: json.dumps({**doc, "adapter": {**doc["adapter"], "init_std": -1}}), "init_std"),
    ],
)
def test_malformed_config(saved: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    config_path = saved / CONFIG_NAME
    config_path.write_text(edit(json.loads(config_path.read_text())))
    with pytest.raises(AdapterLoadError, match=message) as error:
        LofitModel.from_pretrained(tiny_model("llama"), saved)
    assert str(config_path) in str(error.value)


def test_missing_files(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        LofitModel.from_pretrained(tiny_model("llama"), tmp_path / "nowhere")
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        LofitModel.from_pretrained(tiny_model("llama"), saved)


def test_save_is_atomic_and_refuses_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS))

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(persistence, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "a")
    assert list(tmp_path.iterdir()) == []  # no adapter directory, partial or temporary file left
    monkeypatch.undo()

    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        model.save_pretrained(tmp_path / "file")
    with torch.no_grad():
        model.adapter_parameters()[0][0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        model.save_pretrained(tmp_path / "b")
    with pytest.raises(TypeError, match="load_adapter"):
        LofitModel.from_pretrained(model, tmp_path / "a")


def test_saved_files_get_the_usual_permissions(saved: Path) -> None:
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    for name in (CONFIG_NAME, WEIGHTS_NAME):  # safetensors alone would write the weights owner-only
        assert (saved / name).stat().st_mode & 0o777 == expected, name
