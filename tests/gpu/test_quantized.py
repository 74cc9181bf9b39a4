"""GPU only: a bitsandbytes 4-bit / 8-bit base model trains LoFiT offsets; merging folds only the bias.

Skipped unless CUDA and bitsandbytes are present (so CI, on CPU, skips it). On a GPU machine:

    pip install 'lofit[quantization]'          # or carry a bitsandbytes wheel to an offline machine
    PYTHONPATH=src:tests python -m pytest -q tests/gpu/test_quantized.py

The base is $LOFIT_GPU_MODEL (a local model directory, e.g. a saved SmolLM2-135M) if set, else a small
random Llama saved to a temporary directory (nothing is downloaded). Takes well under a minute.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lofit import LofitConfig, LofitModel, get_lofit_model, load_model  # noqa: E402
from lofit.adapters.folding import MergeError  # noqa: E402
from lofit.selection.select import select_heads  # noqa: E402
from lofit.training.offsets import train_offsets  # noqa: E402
from tiny_models import EOS_ID, PAD_ID, tiny_tokenizer  # noqa: E402

RECORDS = [{"prompt": f"{a} plus {b} is", "completion": f" {a + b}."} for a in range(6) for b in range(4)]
HEADS = {0: [0, 3], 2: [5]}
TRAIN = {"epochs": 3, "batch_size": 8, "lr": 0.05, "progress": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("LOFIT_GPU_MODEL"):
        return Path(os.environ["LOFIT_GPU_MODEL"])
    path = tmp_path_factory.mktemp("random-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=256, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:  # type: ignore[no-untyped-def]
    batch = tokenizer(["3 plus 2 is", "5 plus 1 is"], return_tensors="pt", padding=True).to("cuda")
    with torch.no_grad():
        return model(**batch).logits.float()


def packed_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [
        m.weight.data.clone()
        for m in model.modules()
        if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    ]


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantised_base_trains_offsets_and_merges_the_bias_only(
    model_dir: Path, bits: str, tmp_path: Path
) -> None:
    model, tok = load_model(model_dir, quantization=bits, dtype="bf16")
    layer = bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt
    assert isinstance(model.model.layers[0].self_attn.o_proj, layer)
    before = packed_weights(model)

    adapted = train_offsets(model, tok, RECORDS, HEADS, **TRAIN)
    losses = adapted.training_history.losses()
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert all(
        torch.equal(a, b) for a, b in zip(before, packed_weights(adapted.get_base_model()), strict=True)
    )
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in adapted.adapter_parameters())

    adapted.save_pretrained(tmp_path / "adapter")
    expected = logits(adapted, tok)
    fresh, _ = load_model(model_dir, quantization=bits, dtype="bf16")
    reloaded = LofitModel.from_pretrained(fresh, tmp_path / "adapter")
    assert torch.allclose(logits(reloaded, tok), expected, atol=1e-3, rtol=0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = adapted.merge_and_unload()
    assert any("only the offsets were merged" in str(w.message) for w in caught)
    assert all(torch.equal(a, b) for a, b in zip(before, packed_weights(merged), strict=True))
    difference = (logits(merged, tok) - expected).abs().max().item()
    assert difference <= 0.05 * max(1.0, expected.abs().max().item()), difference  # bf16 rounding of W v
    print(
        f"{bits}: losses {losses[0]:.4f} -> {losses[-1]:.4f}; merged vs adapter max |Δlogit| {difference:.2e}"
    )


def test_scales_on_a_quantised_base_train_but_are_not_merged(model_dir: Path) -> None:
    model, tok = load_model(model_dir, quantization="4bit", dtype="bf16")
    selection = select_heads(model, tok, RECORDS, epochs=1, batch_size=8, progress=False)  # trains scales
    assert torch.isfinite(selection.scores).all() and selection.scores.max() > 0
    adapted = get_lofit_model(model, LofitConfig(heads=HEADS, use_scale=True, init_std=0.01))
    with pytest.raises(MergeError, match=r"quantised\) weights; a scale would have to be folded"):
        adapted.merge_and_unload()
