"""The vLLM plugin's parts that need no vLLM: adapter tables, batch routing, adapter reading, `lofit serve`'s argv."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lofit import LofitConfig, get_lofit_model
from lofit.errors import BaseModelMismatchError, LofitValueError
from lofit.integrations.vllm.adapter_files import ServedModel, checkpoint_projections, read_dense_vectors
from lofit.integrations.vllm.plugin import lofit_architecture
from lofit.integrations.vllm.routing import BatchAdapters, adapter_of
from lofit.integrations.vllm.serve import VLLM_MISSING, parse_adapters, vllm_command
from lofit.integrations.vllm.tables import AdapterTables, DenseVectors, ForwardRows, UnknownAdapterError
from tiny_models import tiny_model

HEADS, HEAD_DIM, LAYERS = 4, 3, 2
WIDTH = HEADS * HEAD_DIM


def head_edits(seed: int, scaled: bool) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Random per-(layer, head) edits: the oracle's own description of an adapter."""
    generator = torch.Generator().manual_seed(seed)
    edits = {}
    for layer in range(LAYERS):
        for head in torch.randperm(HEADS, generator=generator)[: 1 + seed % 2].tolist():
            scale = torch.randn(HEAD_DIM, generator=generator) if scaled else torch.zeros(HEAD_DIM)
            edits[(layer, head)] = {"scale": scale, "offset": torch.randn(HEAD_DIM, generator=generator)}
    return edits


def as_dense(edits: dict[tuple[int, int], dict[str, torch.Tensor]], scaled: bool) -> dict[int, DenseVectors]:
    layers: dict[int, DenseVectors] = {}
    for (layer, head), edit in edits.items():
        vectors = layers.setdefault(
            layer, DenseVectors(torch.zeros(WIDTH), torch.ones(WIDTH) if scaled else None)
        )
        assert vectors.offset is not None
        vectors.offset[head * HEAD_DIM : (head + 1) * HEAD_DIM] = edit["offset"]
        if vectors.scale is not None:
            vectors.scale[head * HEAD_DIM : (head + 1) * HEAD_DIM] = 1 + edit["scale"]
    return layers


def oracle(
    hidden: torch.Tensor, layer: int, edits: dict[tuple[int, int], dict[str, torch.Tensor]] | None
) -> torch.Tensor:
    """z <- (1 + A) z + v head by head (docs/method.md §1), for one token."""
    out = hidden.clone()
    for (lay, head), edit in (edits or {}).items():
        if lay == layer:
            cols = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            out[cols] = (1 + edit["scale"]) * hidden[cols] + edit["offset"]
    return out


def test_tables_apply_each_tokens_adapter_as_the_formula_says() -> None:
    tables = AdapterTables(LAYERS, HEADS, HEAD_DIM)
    adapters = {"plain": head_edits(1, False), "scaled": head_edits(2, True), "other": head_edits(3, False)}
    for name, edits in adapters.items():
        tables.add(name, as_dense(edits, scaled=name == "scaled"))
    requests = ["scaled", None, "plain", "other", "plain"]
    starts = torch.tensor([0, 3, 4, 6, 7, 9])  # request i owns tokens starts[i]:starts[i + 1]
    forward = ForwardRows(tables, tables.token_rows(requests, starts))  # one per forward, for every layer
    hidden = torch.randn(11, WIDTH)  # two padding tokens at the end
    for layer in range(LAYERS):
        edited = hidden.clone()
        assert forward.apply(layer, edited) is edited  # in place
        for request, name in enumerate(requests):
            for token in range(int(starts[request]), int(starts[request + 1])):
                want = oracle(hidden[token], layer, adapters.get(name) if name else None)
                torch.testing.assert_close(edited[token], want, rtol=0, atol=1e-6)
        torch.testing.assert_close(edited[9:], hidden[9:], rtol=0, atol=0)  # padding untouched


def test_rows_are_reused_and_growth_keeps_every_adapter() -> None:
    tables = AdapterTables(LAYERS, HEADS, HEAD_DIM)
    edits = {f"a{i}": head_edits(10 + i, False) for i in range(9)}
    rows = {name: tables.add(name, as_dense(e, scaled=False)) for name, e in edits.items()}
    assert sorted(rows.values()) == list(range(1, 10)) and tables.offset.shape[1] == 16
    tables.remove("a3")
    with pytest.raises(UnknownAdapterError, match="'a3'"):
        tables.token_rows(["a3"], torch.tensor([0, 1]))
    assert tables.add("new", as_dense(head_edits(99, False), scaled=False)) == rows["a3"]
    hidden = torch.randn(1, WIDTH)
    for name in ["a0", "a8", "new"]:
        source = head_edits(99, False) if name == "new" else edits[name]
        edited = tables.apply(1, hidden.clone(), tables.token_rows([name], torch.tensor([0, 1])))
        torch.testing.assert_close(edited[0], oracle(hidden[0], 1, source), rtol=0, atol=1e-6)
    with pytest.raises(LofitValueError, match="registered already"):
        tables.add("a0", {})
    assert tables.bytes_per_adapter() == LAYERS * WIDTH * 4


@pytest.mark.parametrize("scaled", [False, True])
def test_bf16_inputs_are_edited_as_lofits_own_layer_does(scaled: bool) -> None:
    """z + v.to(bf16) (offset only) or ((1 + A) * z.float() + v).to(bf16), as `RowVectors.apply`."""
    tables = AdapterTables(LAYERS, HEADS, HEAD_DIM)
    dense = as_dense(head_edits(5, scaled), scaled)
    tables.add("a", dense)
    hidden = torch.randn(3, WIDTH).to(torch.bfloat16)
    edited = tables.apply(1, hidden.clone(), tables.token_rows(["a", None], torch.tensor([0, 2, 3])))
    offset, scale = dense[1].offset, dense[1].scale
    assert offset is not None
    want = hidden[:2] + offset.to(torch.bfloat16) if scale is None else (hidden[:2].float() * scale + offset)
    torch.testing.assert_close(edited[:2], want.to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(edited[2], hidden[2], rtol=0, atol=0)  # the base request


def test_the_offset_table_in_another_dtype_follows_adds_and_removes() -> None:
    tables = AdapterTables(LAYERS, HEADS, HEAD_DIM)
    tables.add("a", {0: DenseVectors(torch.ones(WIDTH), None)})
    assert tables.offset_as(torch.float32) is tables.offset
    assert tables.offset_as(torch.bfloat16)[0, 1].tolist() == [1.0] * WIDTH
    tables.remove("a")
    assert tables.offset_as(torch.bfloat16)[0, 1].tolist() == [0.0] * WIDTH
    tables.add("b", {0: DenseVectors(torch.full((WIDTH,), 2.0), None)})
    assert tables.offset_as(torch.bfloat16)[0, 1].tolist() == [2.0] * WIDTH


def test_only_layers_some_adapter_edits_are_touched() -> None:
    tables = AdapterTables(3, HEADS, HEAD_DIM)
    tables.add("top", {2: DenseVectors(torch.ones(WIDTH), None)})
    assert [tables.edits_layer(i) for i in range(3)] == [False, False, True]
    tables.remove("top")
    assert not tables.edits_layer(2)


def test_batch_adapters_follow_vllms_removes_adds_and_moves() -> None:
    batch = BatchAdapters()
    simulated: list[str | None] = []
    batch.update(3, removed=[], added=[(0, "a"), (1, None), (2, "b")], moved=[])
    simulated = ["a", None, "b"]
    assert batch.current() == simulated and not batch.all_base()
    # Request 0 finishes; vLLM fills the hole with the last request (one-way move 2 -> 0).
    batch.update(2, removed=[0], added=[], moved=[(2, 0, "move")])
    simulated = ["b", None]
    assert batch.current() == simulated
    batch.update(3, removed=[], added=[(2, "c")], moved=[(0, 2, "swap")])
    assert batch.current() == ["c", None, "b"]
    batch.update(1, removed=[0, 2], added=[], moved=[])
    assert batch.current() == [None] and batch.all_base()


def test_adapter_names_come_from_extra_args() -> None:
    assert adapter_of({"lofit_adapter": "x", "other": 1}) == "x"
    assert adapter_of({}) is None and adapter_of({"lofit_adapter": None}) is None
    with pytest.raises(LofitValueError, match="must be an adapter name"):
        adapter_of({"lofit_adapter": 3})


def saved_adapter(tmp_path: Path, scaled: bool, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    base = tiny_model("llama", seed)
    base.save_pretrained(tmp_path / "base")
    model = get_lofit_model(base, LofitConfig(heads={0: [1], 2: [0, 3]}, use_scale=scaled, init_std=0.3))
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


@pytest.mark.parametrize("scaled", [False, True])
def test_read_dense_vectors_equals_lofits_own_dense_vectors(tmp_path: Path, scaled: bool) -> None:
    model, path = saved_adapter(tmp_path, scaled)
    served = ServedModel.from_hf_config(model.config, checkpoint_projections(tmp_path / "base"))
    vectors = read_dense_vectors(path, served)
    assert sorted(vectors) == [0, 2]
    for layer, mine in vectors.items():
        theirs = model.adapter_vectors()[layer]
        torch.testing.assert_close(mine.offset, theirs.dense_offset(), rtol=0, atol=0)
        if scaled:
            torch.testing.assert_close(mine.scale, theirs.dense_scale(), rtol=0, atol=0)
        else:
            assert mine.scale is None


def test_an_adapter_for_other_weights_or_sizes_is_refused(tmp_path: Path) -> None:
    model, path = saved_adapter(tmp_path, False)
    other = tiny_model("llama", seed=1)
    other.save_pretrained(tmp_path / "other")
    served = ServedModel.from_hf_config(other.config, checkpoint_projections(tmp_path / "other"))
    with pytest.raises(BaseModelMismatchError, match="layer 0 differs"):
        read_dense_vectors(path, served)
    wider = ServedModel.from_hf_config(model.config)
    wider = ServedModel(**{**wider.__dict__, "num_heads": 8})
    with pytest.raises(BaseModelMismatchError, match="num_heads=4"):
        read_dense_vectors(path, wider)


def test_architectures_outside_the_plugin_are_refused_with_the_alternative() -> None:
    assert lofit_architecture(["LlamaForCausalLM"]) == "LofitLlamaForCausalLM"
    with pytest.raises(LofitValueError, match="merged export"):
        lofit_architecture(["GPT2LMHeadModel"])


def test_serve_builds_vllms_own_server_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    argv, env = vllm_command(str(tmp_path), parse_adapters(["a=/x", "b=org/b"]), ["--port", "9"])
    assert argv[argv.index("--hf-overrides") + 1] == '{"architectures": ["LofitQwen2ForCausalLM"]}'
    assert argv[-2:] == ["--port", "9"] and env["VLLM_PLUGINS"] == "other,lofit"
    assert json.loads(env["LOFIT_VLLM_ADAPTERS"]) == {"a": "/x", "b": "org/b"}
    for bad in (["a"], ["=x"], ["a=x", "a=y"]):
        with pytest.raises(LofitValueError, match="--adapter"):
            parse_adapters(bad)
    assert "pip install 'lofit[vllm]'" in VLLM_MISSING
