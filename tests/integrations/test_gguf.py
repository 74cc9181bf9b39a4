"""GGUF export: a copy of the base GGUF with the offsets as attn_output biases (file structure, values
against an independent W_O·v oracle, scale folding only into F32 weights, refusals, atomic writes); the
bundled model end to end (slow): the gguf reader, transformers' GGUF loader and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lofit import LofitConfig, get_lofit_model  # noqa: E402
from lofit.cli.main import main  # noqa: E402
from lofit.integrations.gguf import GGUFExportError, export_gguf  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

LAYERS, HEADS, HEAD_DIM, HIDDEN = 3, 4, 8, 32
QUANTIZED_LAYER = 1  # stored as Q8_0 in the tiny GGUF; the others are F32


def write_tiny_gguf(path: Path, model: torch.nn.Module, existing_bias: bool = False) -> None:
    """A llama.cpp-style GGUF of the tiny llama's attention output projections (+ a few other tensors and
    metadata fields of each kind). The quantised layer's weights in `model` are replaced by their Q8_0
    round trip, so that the file and the model hold the same weights."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_embedding_length(HIDDEN)
    writer.add_name("tiny test model")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_tensor("token_embd.weight", model.model.embed_tokens.weight.detach().numpy())
    for layer in range(LAYERS):
        projection = model.model.layers[layer].self_attn.o_proj
        weight = projection.weight.detach().numpy().astype(np.float32)
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        if layer == QUANTIZED_LAYER:
            packed = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(
                f"blk.{layer}.attn_output.weight", packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
            back = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0)
            with torch.no_grad():
                projection.weight.copy_(torch.from_numpy(np.asarray(back, np.float32)))
        else:
            writer.add_tensor(f"blk.{layer}.attn_output.weight", weight)
        if existing_bias and layer == 0:
            writer.add_tensor("blk.0.attn_output.bias", np.full(HIDDEN, 0.25, dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def adapted(model: torch.nn.Module, heads: dict[int, list[int]], use_scale: bool = False, seed: int = 0):  # type: ignore[no-untyped-def]
    lofit_model = get_lofit_model(model, LofitConfig(heads=heads, use_scale=use_scale, init_std=0.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lofit_model.adapter_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return lofit_model


def tensors_of(path: Path) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def fields_of(path: Path) -> list[tuple[str, list[object], object]]:
    reader = gguf.GGUFReader(str(path))
    return [
        (f.name, list(f.types), f.contents()) for f in reader.fields.values() if f.name != "GGUF.tensor_count"
    ]


@pytest.fixture
def base_gguf(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = tiny_model("llama")
    path = tmp_path / "base.gguf"
    write_tiny_gguf(path, model)
    return model, path


def test_offsets_become_attn_output_biases_and_the_rest_is_copied(base_gguf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, source = base_gguf
    before = source.read_bytes()
    weights = {
        layer: model.model.layers[layer].self_attn.o_proj.weight.detach().clone() for layer in range(LAYERS)
    }
    heads = {0: [1, 3], QUANTIZED_LAYER: [2]}
    lofit_model = adapted(model, heads)
    offsets = lofit_model.get_head_params()
    out = export_gguf(lofit_model, source, tmp_path / "out.gguf")
    assert source.read_bytes() == before  # the input is never written to
    original, written = tensors_of(source), tensors_of(out)
    new = [name for name in written if name not in original]
    assert new == ["blk.0.attn_output.bias", f"blk.{QUANTIZED_LAYER}.attn_output.bias"]
    names = list(written)
    assert names.index("blk.0.attn_output.bias") == names.index("blk.0.attn_output.weight") + 1
    for name, tensor in original.items():  # every original tensor: same type, shape and bytes
        copy = written[name]
        assert copy.tensor_type == tensor.tensor_type and list(copy.shape) == list(tensor.shape)
        assert bytes(np.asarray(copy.data).tobytes()) == bytes(np.asarray(tensor.data).tobytes()), name
    assert fields_of(out) == fields_of(source)  # metadata unchanged, in order
    for layer, layer_heads in heads.items():  # oracle: sum over heads of W_O[:, slice] · v, by hand
        expected = torch.zeros(HIDDEN, dtype=torch.float64)
        for head in layer_heads:
            columns = weights[layer][:, head * HEAD_DIM : (head + 1) * HEAD_DIM].double()
            expected += columns @ offsets[(layer, head)]["offset"].double()
        bias = written[f"blk.{layer}.attn_output.bias"]
        assert bias.tensor_type == gguf.GGMLQuantizationType.F32 and list(bias.shape) == [HIDDEN]
        torch.testing.assert_close(
            torch.from_numpy(np.array(bias.data)).double(), expected, rtol=0, atol=1e-5
        )
    merged = lofit_model.merge_and_unload()  # and the PyTorch merge gives the same bias
    for layer in heads:
        got = torch.from_numpy(np.array(written[f"blk.{layer}.attn_output.bias"].data))
        torch.testing.assert_close(
            got, merged.model.layers[layer].self_attn.o_proj.bias.detach(), rtol=0, atol=1e-6
        )


def test_scale_is_folded_exactly_into_an_f32_weight(base_gguf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, source = base_gguf
    lofit_model = adapted(model, {2: [0, 3]}, use_scale=True)
    out = export_gguf(lofit_model, source, tmp_path / "out.gguf")
    written = tensors_of(out)
    merged = lofit_model.merge_and_unload()
    projection = merged.model.layers[2].self_attn.o_proj
    weight = written["blk.2.attn_output.weight"]
    assert weight.tensor_type == gguf.GGMLQuantizationType.F32
    assert torch.equal(torch.from_numpy(np.array(weight.data)), projection.weight.detach())
    bias = torch.from_numpy(np.array(written["blk.2.attn_output.bias"].data))
    torch.testing.assert_close(bias, projection.bias.detach(), rtol=0, atol=1e-6)


def test_a_scale_on_a_quantised_weight_is_refused_and_nothing_is_written(base_gguf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, source = base_gguf
    out = tmp_path / "out.gguf"
    out.write_bytes(b"an earlier file")
    lofit_model = adapted(model, {QUANTIZED_LAYER: [0]}, use_scale=True)
    with pytest.raises(GGUFExportError, match=r"Q8_0.*offsets-only"):
        export_gguf(lofit_model, source, out)
    assert out.read_bytes() == b"an earlier file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf", "out.gguf"]  # no temp file left


def test_an_existing_bias_is_added_to(tmp_path: Path) -> None:
    model = tiny_model("llama")
    source = tmp_path / "base.gguf"
    write_tiny_gguf(source, model, existing_bias=True)
    lofit_model = adapted(model, {0: [2]})
    out = export_gguf(lofit_model, source, tmp_path / "out.gguf")
    written = tensors_of(out)
    assert list(written).count("blk.0.attn_output.bias") == 1
    offset = lofit_model.get_head_params()[(0, 2)]["offset"]
    weight = model.model.layers[0].self_attn.o_proj.base_layer.weight.detach()
    expected = 0.25 + weight[:, 2 * HEAD_DIM : 3 * HEAD_DIM] @ offset
    torch.testing.assert_close(torch.from_numpy(np.array(written["blk.0.attn_output.bias"].data)), expected)


def test_bad_requests_are_refused_clearly(base_gguf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, source = base_gguf
    lofit_model = adapted(model, {0: [0]})
    with pytest.raises(GGUFExportError, match="input GGUF"):
        export_gguf(lofit_model, source, source)
    with pytest.raises(GGUFExportError, match="no such GGUF"):
        export_gguf(lofit_model, tmp_path / "missing.gguf", tmp_path / "o.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFExportError, match="not a readable GGUF"):
        export_gguf(lofit_model, tmp_path / "junk.gguf", tmp_path / "o.gguf")
    other = adapted(tiny_model("llama", seed=1), {0: [0]})  # same shapes, other weights
    with pytest.raises(GGUFExportError, match="differs from the adapter's base model"):
        export_gguf(other, source, tmp_path / "o.gguf")
    wider = get_lofit_model(tiny_model("qwen3"), LofitConfig(heads={0: [0]}))  # 3 x 4 heads of 12 dims
    with pytest.raises(GGUFExportError, match="the adapter expects 48"):
        export_gguf(wider, source, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


def test_cli_merge_gguf_needs_a_gguf_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["merge", "--model", str(tmp_path), "--adapter", str(tmp_path), "--gguf", str(tmp_path / "o.gguf")]
    )
    assert code == 2 and "--gguf needs a GGUF base model" in capsys.readouterr().err
    code = main(["merge", "--model", str(tmp_path), "--adapter", str(tmp_path)])
    assert code == 2 and "--out DIR" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bundled model
@pytest.mark.slow
def test_bundled_model_gguf_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """smollm2-135m (Q4_1 GGUF): `lofit merge --gguf`, then the gguf reader and transformers' loader."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lofit import LofitModel, load_model
    from lofit.integrations.gguf import gguf_file_of

    source = gguf_file_of("smollm2-135m")
    model, tokenizer = load_model("smollm2-135m")
    heads = {3: [0, 4], 11: [2], 29: [8]}
    adapted(model, heads).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "smollm2-lofit.gguf"
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--gguf", str(out)]) == 0, (
        capsys.readouterr().err
    )
    original, written = tensors_of(source), tensors_of(out)
    assert sorted(set(written) - set(original)) == sorted(f"blk.{layer}.attn_output.bias" for layer in heads)
    assert all(written[n].tensor_type == t.tensor_type for n, t in original.items())
    assert fields_of(out) == fields_of(source)
    lofit_model = LofitModel.from_pretrained(model, tmp_path / "adapter")
    ids = tokenizer("Q: What is the capital of France?\nA:", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = lofit_model(input_ids=ids).logits
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name)
    assert (
        plain.model.layers[3].self_attn.o_proj.bias is None
    )  # transformers drops attn_output.bias by default
    config = AutoConfig.from_pretrained(str(tmp_path), gguf_file=out.name)
    config.attention_bias = True  # then it maps attn_output.bias; q/k/v biases (absent) start at zero
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, config=config)
    assert float(loaded.model.layers[3].self_attn.q_proj.bias.detach().abs().max()) == 0.0
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4)
    merged = lofit_model.merge_and_unload()
    for layer in heads:
        bias = torch.from_numpy(np.array(written[f"blk.{layer}.attn_output.bias"].data))
        torch.testing.assert_close(
            bias, merged.model.layers[layer].self_attn.o_proj.bias.detach(), rtol=0, atol=1e-5
        )


def llama_cpp_logits(path: Path, token_ids: list[int]) -> np.ndarray:
    """Every position's logits of `token_ids` under llama.cpp (llama-cpp-python), CPU, fp32 logits."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (builds llama.cpp)")
    model = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False, seed=0)
    try:
        model.eval(token_ids)
        return np.array(model.scores[: len(token_ids)], dtype=np.float32)
    finally:
        model.close()


@pytest.mark.slow
def test_llama_cpp_applies_the_exported_offsets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """llama.cpp itself runs `lofit merge --gguf`'s file: its logit change from the base GGUF is the PyTorch
    adapter's change from the base (llama.cpp computes Q4_1 x Q8 products, so both are compared as changes)."""
    from lofit import load_model
    from lofit.integrations.gguf import gguf_file_of

    source = gguf_file_of("smollm2-135m")
    model, tokenizer = load_model("smollm2-135m")
    heads = {3: [0, 4], 11: [2], 20: [5], 29: [8]}
    lofit_model = adapted(model, heads)
    lofit_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "smollm2-lofit.gguf"
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--gguf", str(out)]) == 0, (
        capsys.readouterr().err
    )
    ids = tokenizer("Q: What is the capital of France?\nA:").input_ids
    base_cpp, lofit_cpp = llama_cpp_logits(source, ids), llama_cpp_logits(out, ids)
    with torch.no_grad():
        lofit_torch = lofit_model(input_ids=torch.tensor([ids])).logits[0].numpy()
        with lofit_model.disable_adapter():
            base_torch = lofit_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    change_cpp, change_torch = lofit_cpp - base_cpp, lofit_torch - base_torch
    assert np.abs(change_torch).max() > 1.0  # the adapter moves the logits clearly
    # the same change: highly correlated, same size, and llama.cpp's noise on it far below the change itself
    correlation = np.corrcoef(change_cpp.ravel(), change_torch.ravel())[0, 1]
    relative = np.linalg.norm(change_cpp - change_torch) / np.linalg.norm(change_torch)
    agreement = (lofit_cpp.argmax(-1) == lofit_torch.argmax(-1)).mean()
    print(
        f"llama.cpp vs PyTorch: correlation {correlation:.4f}, relative error {relative:.3f}, argmax {agreement:.2f}"
    )
    assert correlation > 0.98, correlation
    assert relative < 0.2, relative
    # and the next-token choice of the adapted model agrees between the engines at most positions
    assert agreement >= 0.8, agreement
