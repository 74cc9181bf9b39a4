"""Logit lens of offsets: top tokens of W_U · norm(W_O[:, head] v), against a hand-written oracle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lofit.adapters.config import LofitConfig
from lofit.adapters.model import get_lofit_model
from lofit.errors import LofitError
from lofit.evaluation.logit_lens import logit_lens_markdown, offset_logit_lens
from tiny_models import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def oracle_top(model: torch.nn.Module, layer: int, head: int, v: torch.Tensor, k: int) -> list[int]:
    """Llama by hand: o_proj columns of the head, RMSNorm written out, lm_head weight."""
    config = model.config
    d = config.hidden_size // config.num_attention_heads
    w_o = model.model.layers[layer].self_attn.o_proj.weight  # [hidden, heads * d]
    x = w_o[:, head * d : (head + 1) * d] @ v
    normed = x / torch.sqrt(x.pow(2).mean() + config.rms_norm_eps) * model.model.norm.weight
    return (model.lm_head.weight @ normed).topk(k).indices.tolist()


def test_matches_oracle_on_plain_model_and_on_lofit_adapter() -> None:
    model, tok = tiny_model("llama", 0), tiny_tokenizer()
    torch.manual_seed(0)
    d = model.config.hidden_size // model.config.num_attention_heads
    offsets = {(0, 1): torch.randn(d), (1, 3): torch.randn(d)}
    lens = offset_logit_lens(model, tok, offsets, top_k=5)
    assert [(h.layer, h.head) for h in lens] == [(0, 1), (1, 3)]
    for entry in lens:
        with torch.no_grad():
            assert entry.token_ids == oracle_top(
                model, entry.layer, entry.head, offsets[(entry.layer, entry.head)], 5
            )
        assert entry.tokens == [tok.decode([i]) for i in entry.token_ids]
        assert entry.scores == sorted(entry.scores, reverse=True)
    wrapped = get_lofit_model(model, LofitConfig(heads={0: [1], 1: [3]}, use_scale=False, init_std=0.0))
    wrapped.set_head_params({pair: {"offset": v} for pair, v in offsets.items()})
    from_adapter = offset_logit_lens(wrapped, tok, top_k=5)  # reads the adapter's own offsets
    assert [h.token_ids for h in from_adapter] == [h.token_ids for h in lens]
    # RMSNorm removes the scale of v: 10 v promotes the same tokens.
    scaled = offset_logit_lens(model, tok, {k: 10 * v for k, v in offsets.items()}, top_k=5)
    assert [h.token_ids for h in scaled] == [h.token_ids for h in lens]
    table = logit_lens_markdown(lens)
    assert table.splitlines()[0].startswith("| head") and len(table.splitlines()) == 4


def test_bad_inputs_raise_lofit_errors() -> None:
    model, tok = tiny_model("llama", 0), tiny_tokenizer()
    with pytest.raises(LofitError, match="outside"):
        offset_logit_lens(model, tok, {(99, 0): torch.zeros(8)})
    with pytest.raises(LofitError, match="values"):
        offset_logit_lens(model, tok, {(0, 0): torch.zeros(3)})
    with pytest.raises(LofitError, match="offsets="):
        offset_logit_lens(model, tok)
    with pytest.raises(LofitError, match="top_k"):
        offset_logit_lens(model, tok, {(0, 0): torch.zeros(8)}, top_k=0)


def test_benchmark_script_reads_a_saved_adapter(tmp_path: Path) -> None:
    from benchmarks import logit_lens as script

    model, tok = tiny_model("llama", 0), tiny_tokenizer()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    wrapped = get_lofit_model(model, LofitConfig(heads={1: [2]}, use_scale=False, init_std=0.0))
    v = torch.linspace(-1, 1, model.config.hidden_size // model.config.num_attention_heads)
    wrapped.set_head_params({(1, 2): {"offset": v}})
    wrapped.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "lens.md"
    argv = [str(tmp_path / "adapter"), "--model", str(tmp_path / "base"), "--top-k", "3", "--out", str(out)]
    assert script.main(argv) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and lines[2].startswith("| (1, 2) |")
    with torch.no_grad():
        expected = [tok.decode([i]) for i in oracle_top(model, 1, 2, v, 3)]
    assert all(f"`{t.strip() or repr(t)}`" in lines[2] for t in expected)
