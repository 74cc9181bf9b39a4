"""Adapters are checked tensor by tensor and field by field on load; the Python entry points refuse bad
arguments and impossible states with a lofit error that says what to change.

Categories: adapter files that must be refused (`test_damaged_adapter_is_refused`), config fields that
must be refused (`test_config_field_is_refused`), calls on a model in the wrong state
(`test_call_in_a_wrong_state`), bad arguments of the Python entry points (`test_bad_argument`), and
`from_pretrained`'s mode (`test_from_pretrained_mode`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lofit import LofitConfig, LofitModel, combine_adapters, get_lofit_model
from lofit.adapters.persistence import CONFIG_NAME, WEIGHTS_NAME, unpack_vectors
from lofit.errors import AdapterLoadError, LofitError
from tiny_models import tiny_model

HEADS = {0: [0, 2], 2: [1]}  # tiny llama: 3 layers x 4 heads, head_dim 8


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "adapter"
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, use_scale=True, init_std=0.1))
    model.save_pretrained(path)
    return path


@pytest.fixture
def saved(template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "adapter"
    shutil.copytree(template, path)
    return path


def _set(key: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.__setitem__(key, value)


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.pop(key)


# ------------------------------------------------------------------------------- tensor checks
TENSOR_DAMAGE = {
    "float64 1e300 offsets (inf in float32)": (
        _set("layers.0.offset", torch.full((2, 8), 1e300, dtype=torch.float64)),
        "too large for torch.float32",
    ),
    "float64 -1e39 scale": (
        _set("layers.2.scale", torch.full((1, 8), -1e39, dtype=torch.float64)),
        "too large for torch.float32",
    ),
    "float64 NaN offsets": (
        _set("layers.0.offset", torch.full((2, 8), float("nan"), dtype=torch.float64)),
        "NaN or inf",
    ),
    "int32 offsets": (_set("layers.0.offset", torch.ones(2, 8, dtype=torch.int32)), "int32"),
    "int64 offsets": (_set("layers.0.offset", torch.ones(2, 8, dtype=torch.int64)), "int64"),
    "uint8 offsets": (_set("layers.0.offset", torch.ones(2, 8, dtype=torch.uint8)), "uint8"),
    "bool offsets": (_set("layers.0.offset", torch.ones(2, 8, dtype=torch.bool)), "bool"),
    "int8 scale": (_set("layers.2.scale", torch.ones(1, 8, dtype=torch.int8)), "int8"),
    "float heads": (_set("layers.0.heads", torch.tensor([0.0, 2.0])), "head indices are integers"),
    "bool heads": (_set("layers.0.heads", torch.tensor([False, True])), "head indices are integers"),
    "2-d heads": (_set("layers.0.heads", torch.tensor([[0, 2]])), "head indices of layer 0"),
    "missing heads": (_drop("layers.2.heads"), "'layers.2.heads' is missing"),
    "missing offset": (_drop("layers.0.offset"), "'layers.0.offset' is missing"),
    "offset of a transposed shape": (_set("layers.0.offset", torch.zeros(8, 2)), "shape"),
    "offset with an extra dimension": (_set("layers.0.offset", torch.zeros(2, 8, 1)), "shape"),
    "an unnamed offset": (_set("layers.1.offset", torch.zeros(1, 8)), "does not name"),
    "an unnamed extra tensor": (_set("lm_head.weight", torch.zeros(4, 4)), "does not name"),
    "heads of an unnamed layer": (_set("layers.1.heads", torch.tensor([0])), "does not name"),
}


@pytest.mark.parametrize("damage", list(TENSOR_DAMAGE), ids=list(TENSOR_DAMAGE))
def test_damaged_adapter_is_refused(saved: Path, damage: str) -> None:
    edit, message = TENSOR_DAMAGE[damage]
    weights = saved / WEIGHTS_NAME
    tensors = unpack_vectors(load_file(str(weights)), weights)  # one tensor per layer (format 1 layout)
    edit(tensors)
    save_file(tensors, str(weights))
    with pytest.raises(AdapterLoadError, match=message) as error:
        LofitModel.from_pretrained(tiny_model("llama"), saved)
    assert str(weights) in str(error.value)


@pytest.mark.parametrize(("dtype", "value"), [(torch.float16, 1e5), (torch.bfloat16, 1e39)])
def test_offsets_must_be_finite_in_the_models_dtype(saved: Path, dtype: torch.dtype, value: float) -> None:
    weights = saved / WEIGHTS_NAME
    tensors = unpack_vectors(load_file(str(weights)), weights)  # one tensor per layer (format 1 layout)
    tensors["layers.0.offset"] = torch.full((2, 8), value, dtype=torch.float64)
    save_file(tensors, str(weights))
    with pytest.raises(AdapterLoadError, match=f"too large for {dtype}"):
        LofitModel.from_pretrained(tiny_model("llama").to(dtype), saved)


def test_an_offset_finite_in_float32_loads_on_a_float32_model(saved: Path) -> None:
    weights = saved / WEIGHTS_NAME
    tensors = unpack_vectors(load_file(str(weights)), weights)  # one tensor per layer (format 1 layout)
    tensors["layers.0.offset"] = torch.full((2, 8), 1e5, dtype=torch.float64)  # float64 is allowed
    save_file(tensors, str(weights))
    model = LofitModel.from_pretrained(tiny_model("llama"), saved)
    assert model.get_head_params()[(0, 0)]["offset"].tolist() == [1e5] * 8


# ------------------------------------------------------------------------------- config checks
def _adapter(**fields: object) -> Callable[[dict], None]:  # type: ignore[type-arg]
    return lambda doc: doc["adapter"].update(fields)


def _top(**fields: object) -> Callable[[dict], None]:  # type: ignore[type-arg]
    return lambda doc: doc.update(fields)


CONFIG_DAMAGE = {
    "layer key ' 0'": (_adapter(heads={" 0": [0, 2], "2": [1]}), "layer key ' 0' is not a layer index"),
    "layer key '+0'": (_adapter(heads={"+0": [0, 2], "2": [1]}), "not a layer index"),
    "layer key '0x0'": (_adapter(heads={"0x0": [0, 2], "2": [1]}), "not a layer index"),
    "layer key '٣' (Arabic digit)": (_adapter(heads={"٣": [0]}), "not a layer index"),
    "layer key of 5,000 digits": (_adapter(heads={"9" * 5000: [0]}), "not a layer index"),
    "head index 1.0": (_adapter(heads={"0": [1.0]}), "not an integer head index"),
    "head index true": (_adapter(heads={"0": [True]}), "not an integer head index"),
    "use_offset 'yes'": (_adapter(use_offset="yes"), "use_offset must be true or false"),
    "use_scale 1": (_adapter(use_scale=1), "use_scale must be true or false"),
    "use_offset null": (_adapter(use_offset=None), "use_offset must be true or false"),
    "init_std '0.1'": (_adapter(init_std="0.1"), "init_std"),
    "init_std true": (_adapter(init_std=True), "init_std"),
    "init_std 1e300": (_adapter(init_std=1e300), "init_std"),
    "target_modules ''": (_adapter(target_modules=[""]), "target_modules"),
    "target_modules {}": (_adapter(target_modules={"o_proj": 1}), "target_modules"),
    "adapter a list": (_top(adapter=[1]), "'adapter' is missing or not an object"),
    "format_version -5": (_top(format_version=-5), "format_version -5 is not supported"),
    "format_version 0": (_top(format_version=0), "format_version 0 is not supported"),
    "format_version true": (_top(format_version=True), "format_version True is not supported"),
    "format_version '1'": (_top(format_version="1"), "format_version '1' is not supported"),
    "format_version 10**30": (_top(format_version=10**30), "upgrade lofit"),
    "format_version of 5,000 digits": (_top(format_version="VERSION"), "a number too long"),
    "head index of 5,000 digits": (_adapter(heads={"0": ["HEAD"]}), "a number too long"),
}


@pytest.mark.parametrize("damage", list(CONFIG_DAMAGE), ids=list(CONFIG_DAMAGE))
def test_config_field_is_refused(saved: Path, damage: str) -> None:
    edit, message = CONFIG_DAMAGE[damage]
    config_path = saved / CONFIG_NAME
    document = json.loads(config_path.read_text())
    edit(document)
    text = json.dumps(document).replace('"VERSION"', "9" * 5000).replace('"HEAD"', "7" * 5000)
    config_path.write_text(text)
    with pytest.raises(AdapterLoadError, match=message) as error:
        LofitModel.from_pretrained(tiny_model("llama"), saved)
    assert str(config_path) in str(error.value)


def _make_dir(path: Path) -> None:
    path.mkdir()


def _make_fifo(path: Path) -> None:
    os.mkfifo(path)


def _link_dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _huge(path: Path) -> None:
    with path.open("wb") as file:
        file.truncate(64 << 20)  # sparse: costs no disk


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        (CONFIG_NAME, _make_dir, "is a directory"),
        (CONFIG_NAME, _make_fifo, "is a FIFO"),
        (CONFIG_NAME, _link_dev_zero, "is a device"),
        (CONFIG_NAME, _huge, "not an adapter config"),
        (WEIGHTS_NAME, _make_dir, "is a directory"),
        (WEIGHTS_NAME, _make_fifo, "is a FIFO"),
        (WEIGHTS_NAME, _link_dev_zero, "is a device"),
    ],
    ids=["config dir", "config fifo", "config /dev/zero", "config 64 MB", "weights dir", "weights fifo",
         "weights /dev/zero"],
)  # fmt: skip
def test_adapter_file_that_is_not_a_regular_file(
    saved: Path, name: str, make: Callable[[Path], None], message: str
) -> None:
    (saved / name).unlink()
    make(saved / name)
    with pytest.raises(AdapterLoadError, match=message) as error:  # not "not found", and no hang
        LofitModel.from_pretrained(tiny_model("llama"), saved)
    assert str(saved / name) in str(error.value)


# ------------------------------------------------------------------------------ model states
def _fresh() -> LofitModel:
    return get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, init_std=0.1))


STATES: dict[str, Callable[[LofitModel, Path], object]] = {
    "merge_and_unload twice": lambda m, p: (m.merge_and_unload(), m.merge_and_unload()),
    "unload twice": lambda m, p: (m.unload(), m.unload()),
    "unload after merge_and_unload": lambda m, p: (m.merge_and_unload(), m.unload()),
    "save_pretrained after merge_and_unload": lambda m, p: (m.merge_and_unload(), m.save_pretrained(p)),
    "save_pretrained after unload": lambda m, p: (m.unload(), m.save_pretrained(p)),
    "add_adapter after unload": lambda m, p: (m.unload(), m.add_adapter("b", LofitConfig(heads=HEADS))),
    "set_adapter after unload": lambda m, p: (m.unload(), m.set_adapter("default")),
    "merge_adapter after merge_and_unload": lambda m, p: (m.merge_and_unload(), m.merge_adapter()),
    "adapter_parameters after unload": lambda m, p: (m.unload(), m.adapter_parameters()),
}


@pytest.mark.parametrize("steps", list(STATES), ids=list(STATES))
def test_call_in_a_wrong_state(steps: str, tmp_path: Path) -> None:
    with pytest.raises(
        LofitError, match=r"was unwrapped by (merge_and_)?unload\(\).*use the model that call"
    ):
        STATES[steps](_fresh(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- bad arguments
def _two_adapters() -> LofitModel:
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, init_std=0.1), "a")
    model.add_adapter("b", LofitConfig(heads={0: [0]}, init_std=0.1))
    return model


BAD_CALLS: dict[str, tuple[Callable[[Path], object], str]] = {
    "adapter name ' '": (
        lambda p: get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS), " "),
        "adapter_name must be",
    ),
    "adapter name 'default\\n'": (
        lambda p: get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS), "default\n"),
        "adapter_name must be",
    ),
    "adapter name ' a'": (lambda p: _fresh().add_adapter(" a", LofitConfig(heads=HEADS)), "adapter_name"),
    "adapter name with NUL": (
        lambda p: _fresh().add_adapter("a\x00", LofitConfig(heads=HEADS)),
        "adapter_name",
    ),
    "adapter name of 1,000 chars": (
        lambda p: _fresh().add_adapter("a" * 1000, LofitConfig(heads=HEADS)),
        "at most",
    ),
    "adapter name 3": (lambda p: _fresh().add_adapter(3, LofitConfig(heads=HEADS)), "adapter_name"),  # type: ignore[arg-type]
    "config a dict": (
        lambda p: get_lofit_model(tiny_model("llama"), {"heads": HEADS}),
        r"LofitConfig\(\*\*your_dict\)",
    ),  # type: ignore[arg-type]
    "base model a name": (lambda p: get_lofit_model("gpt2", LofitConfig()), "AutoModelForCausalLM"),  # type: ignore[arg-type]
    "base model None": (lambda p: LofitModel.from_pretrained(None, p), "got NoneType"),  # type: ignore[arg-type]
    "head index of 5,000 digits": (
        lambda p: get_lofit_model(tiny_model("llama"), LofitConfig(heads={0: [10**5000]})),
        "more than 40 digits",
    ),
    "layer index of 5,000 digits": (
        lambda p: get_lofit_model(tiny_model("llama"), LofitConfig(heads={10**5000: [0]})),
        "more than 40 digits",
    ),
    "init_std 10**5000": (lambda p: LofitConfig(init_std=10**5000), "far too large"),
    "NUL byte in the adapter path": (
        lambda p: LofitModel.from_pretrained(tiny_model("llama"), str(p) + "\x00x"),
        "NUL byte",
    ),
    "NUL byte in load_adapter's path": (lambda p: _fresh().load_adapter(f"{p}\x00", "b"), "NUL byte"),
    "adapter path an int": (lambda p: LofitModel.from_pretrained(tiny_model("llama"), 3), "got int"),  # type: ignore[arg-type]
    "is_trainable 'yes'": (
        lambda p: LofitModel.from_pretrained(tiny_model("llama"), p, is_trainable="yes"),  # type: ignore[arg-type]
        "is_trainable must be",
    ),
    "combine weights 1e300 (inf vectors)": (
        lambda p: combine_adapters(_two_adapters(), ["a", "b"], weights=[1e300, 1e300]),
        "not finite in torch.float32",
    ),
    "combine weights 1e38 x2 (inf sum)": (
        lambda p: combine_adapters(_two_adapters(), ["a", "b"], weights=[3e39, -3e39]),
        "not finite",
    ),
    "set_head_params of an unadapted head": (
        lambda p: _fresh().set_head_params({(1, 0): {"offset": torch.zeros(8)}}),
        r"head \(1, 0\) is not part",
    ),
    "set_head_params of an unknown part": (
        lambda p: _fresh().set_head_params({(0, 0): {"bias": torch.zeros(8)}}),
        "unknown head parameter 'bias'",
    ),
    "set_head_params of a wrong shape": (
        lambda p: _fresh().set_head_params({(0, 0): {"offset": torch.zeros(9)}}),
        r"expected shape \(8,\)",
    ),
    "set_head_params of NaN": (
        lambda p: _fresh().set_head_params({(0, 0): {"offset": torch.full((8,), float("nan"))}}),
        "NaN or inf",
    ),
}


@pytest.mark.parametrize("call", list(BAD_CALLS), ids=list(BAD_CALLS))
def test_bad_argument(call: str, saved: Path) -> None:
    run, message = BAD_CALLS[call]
    with pytest.raises(LofitError, match=message):
        run(saved)


def test_combine_refusal_leaves_no_adapter_behind() -> None:
    model = _two_adapters()
    with pytest.raises(LofitError):
        combine_adapters(model, ["a", "b"], weights=[1e300, 1e300], new_name="c")
    assert model.adapter_names == ["a", "b"]


def test_combine_overflow_in_the_models_dtype() -> None:
    model = get_lofit_model(tiny_model("llama").to(torch.float16), LofitConfig(heads=HEADS), "a")
    model.add_adapter("b", LofitConfig(heads=HEADS))
    with torch.no_grad():
        for name in ("a", "b"):
            for param in model.adapter_parameters(name):
                param.fill_(40000.0)  # finite in float16; the sum 80000 is not
    with pytest.raises(LofitError, match=r"not finite in torch\.float16"):
        combine_adapters(model, ["a", "b"])


# --------------------------------------------------------------------------------- mode
@pytest.mark.parametrize("is_trainable", [False, True])
def test_from_pretrained_mode(saved: Path, is_trainable: bool) -> None:
    base = tiny_model("llama").train()
    model = LofitModel.from_pretrained(base, saved, is_trainable=is_trainable)
    assert model.training is is_trainable
    assert all(module.training is is_trainable for module in model.modules())
    assert all(p.requires_grad is is_trainable for p in model.adapter_parameters())
    assert not any(p.requires_grad for n, p in model.get_base_model().named_parameters() if "lofit" not in n)
    if not is_trainable:  # inference with one adapter per row works without calling .eval() first
        output = model(input_ids=torch.tensor([[3, 4], [5, 6]]), adapter_names=["default", "__base__"])
        assert torch.isfinite(output.logits).all()
