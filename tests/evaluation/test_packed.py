"""Packed scoring (every continuation of a request in one row, a block attention mask): equal to a plain
per-continuation forward pass, the default fast path where the model takes the mask, a fallback where not."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lofit import LofitConfig, get_lofit_model
from lofit.evaluation import ScoringRequest, score_continuations
from lofit.evaluation import packed as packed_module
from lofit.evaluation.bounds import NonFiniteLogitsError
from lofit.evaluation.packed import PREFIX_SOURCE, block_mask, pack_request, score_rows
from lofit.training.tokens import encode
from tiny_models import tiny_model, tiny_tokenizer

REQUESTS = [
    ScoringRequest("Q: The cat sat on the\nA:", [" mat", " matter", " hat", " m"]),
    ScoringRequest("Q: A dog\nA:", [" barks.", " b", " barked loudly"]),
    ScoringRequest("Q: Z\nA:", ["zz", "z"]),
    ScoringRequest("Q: Which one is the longest question here?\nA:", [" this", " that one"]),
]


def plain_logprobs(model: torch.nn.Module, context: str, continuation: str) -> torch.Tensor:
    """The oracle: one unpadded forward of context + continuation, log p of each continuation token (fp64)."""
    tokenizer = tiny_tokenizer()
    context_ids, ids = encode(tokenizer, context), encode(tokenizer, context + continuation)
    model.eval()  # no dropout (a LofitModel comes back in training mode)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return torch.stack([logprobs[p - 1, ids[p]] for p in range(len(context_ids), len(ids))])


class OwnLogits:
    """A runner whose score table is the model's own logits (no body/head split)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def forward(self, input_ids: torch.Tensor, cache: Any = None, **extra: Any) -> tuple[torch.Tensor, Any]:
        return self.model(input_ids=input_ids, use_cache=False, **extra).logits, None

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


def decoder_masks(model: torch.nn.Module) -> list[int]:
    """Record the rank of the attention mask of every decoder-body call (4: the packed path ran)."""
    from lofit.training.trainable import causal_lm_of

    ranks: list[int] = []

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        ranks.append(0 if mask is None else mask.dim())

    causal_lm_of(model).get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    return ranks


def test_a_row_holds_the_shared_part_then_each_continuation_without_its_last_token():
    row = pack_request([[1, 2, 3, 4, 5], [1, 2, 3, 6], [1, 2, 3, 4, 7, 8]], [3, 3, 3], start=2)
    # the shared [1, 2, 3] after the prefix [1, 2]; then each continuation's own tokens but its last one
    assert row.ids == [3, 4, 4, 7]
    assert row.positions == [2, 3, 3, 4]  # each continuation restarts after the shared part
    assert row.segments == [0, 1, 3, 3]  # continuation 2's only own token (6) predicts nothing: no segment
    assert row.targets == [[4, 5], [6], [4, 7, 8]]
    assert row.sources == [[0, 1], [0], [0, 2, 3]]
    prefix_only = pack_request([[1, 2, 3], [1, 2, 4]], [2, 2], start=2)
    assert prefix_only.ids == [] and prefix_only.sources == [[PREFIX_SOURCE], [PREFIX_SOURCE]]


def test_the_block_mask_lets_a_continuation_see_the_shared_part_and_itself_only():
    mask = block_mask(torch.tensor([[0, 0, 1, 1, 2, -1]]), prefix_length=1, dtype=torch.float32)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 1, 0],  # continuation 2 skips continuation 1
        [1, 1, 1, 0, 0, 0, 1],  # padding: no real token sees it
    ]
    assert mask.dtype == torch.float32 and float(mask.min()) == torch.finfo(torch.float32).min


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen3"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_packed_rows_equal_a_plain_forward_per_continuation(model_type, attention, padding_side):
    """score_rows on several requests of different lengths in one pass (right-padded rows), per token, against
    one unpadded forward per continuation; the tokenizer's padding side must not matter."""
    model = tiny_model(model_type)
    model.set_attn_implementation(attention)
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = padding_side
    rows, expected = [], []
    for request in REQUESTS:
        context_ids = encode(tokenizer, request.context)
        sequences = [encode(tokenizer, request.context + c) for c in request.continuations]
        rows.append(pack_request(sequences, [len(context_ids)] * len(sequences), start=0))
        expected.extend(plain_logprobs(model, request.context, c) for c in request.continuations)

    with torch.no_grad():
        got = score_rows(OwnLogits(model), rows, None, None, torch.float32, torch.device("cpu"))
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.double() == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_fast_scorer_packs_and_equals_plain_forwards_with_an_adapter(model_type, batch_size):
    """The default scorer runs packed passes (4D masks) on a LofitModel, with a global prefix ("Q: ") in a KV
    cache, and every score equals a plain forward of the adapted model; the adapter changes the scores."""
    model = get_lofit_model(tiny_model(model_type), LofitConfig(use_scale=True, init_std=0.3))
    ranks = decoder_masks(model)
    scores = score_continuations(model, tiny_tokenizer(), REQUESTS, batch_size=batch_size, progress=False)
    assert 4 in ranks
    for request, row in zip(REQUESTS, scores, strict=True):
        for continuation, score in zip(request.continuations, row, strict=True):
            assert score == pytest.approx(
                float(plain_logprobs(model, request.context, continuation).sum()), abs=1e-5
            )
    with model.disable_adapter():
        base = score_continuations(model, tiny_tokenizer(), REQUESTS[:1], progress=False)[0]
    assert base != pytest.approx(scores[0], abs=1e-3)


def _causal_only(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kwargs: Any
):  # type: ignore[no-untyped-def]
    """SDPA that drops the given mask when there is no cache (queries == keys) and masks causally itself: an
    attention kernel that cannot take a custom mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, None if query.shape[2] == key.shape[2] else mask, **kwargs
    )


def test_a_model_that_ignores_the_block_mask_falls_back_to_the_kv_cache_scorer():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("lofit_test_causal_only", _causal_only)
    ALL_MASK_ATTENTION_FUNCTIONS.register("lofit_test_causal_only", sdpa_mask)
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    naive = score_continuations(model, tokenizer, REQUESTS, scorer="naive", progress=False)
    model.set_attn_implementation("lofit_test_causal_only")
    masked_causally = score_continuations(model, tokenizer, REQUESTS, scorer="naive", progress=False)
    for a, b in zip(naive, masked_causally, strict=True):
        assert b == pytest.approx(a, abs=1e-5)  # without a cache or padding it is plain causal attention
    ranks = decoder_masks(model)
    fast = score_continuations(model, tokenizer, REQUESTS, progress=False)
    assert 4 in ranks  # the packed path was tried (its probe) ...
    for a, b in zip(naive, fast, strict=True):  # ... and left: the scores are the KV-cache scorer's
        assert b == pytest.approx(a, abs=1e-5)
    context_ids = encode(tokenizer, REQUESTS[0].context)
    sequences = [encode(tokenizer, REQUESTS[0].context + c) for c in REQUESTS[0].continuations]
    row = pack_request(sequences, [len(context_ids)] * len(sequences), start=0)
    with torch.no_grad():  # the packed scores themselves would have been wrong
        wrong = score_rows(OwnLogits(model), [row], None, None, torch.float32, torch.device("cpu"))
    assert max(abs(float(w.sum()) - n) for w, n in zip(wrong, naive[0], strict=True)) > 1e-3


def test_a_forward_error_on_the_packed_path_falls_back(monkeypatch):
    def refuse(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("this attention takes no 4D mask")

    monkeypatch.setattr(packed_module, "block_mask", refuse)
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    naive = score_continuations(model, tokenizer, REQUESTS, scorer="naive", progress=False)
    fast = score_continuations(model, tokenizer, REQUESTS, progress=False)
    for a, b in zip(naive, fast, strict=True):
        assert b == pytest.approx(a, abs=1e-5)


def test_sequences_longer_than_the_sliding_window_use_the_kv_cache_scorer():
    """gemma2's window (64 tokens) is left out of the block mask: a longer sequence keeps the cached path."""
    model, tokenizer = tiny_model("gemma2"), tiny_tokenizer()
    ranks = decoder_masks(model)
    short = score_continuations(model, tokenizer, REQUESTS, progress=False)
    assert 4 in ranks
    ranks.clear()
    long = [ScoringRequest("x" * 70 + "?", [" yes", " no"])]
    fast = score_continuations(model, tokenizer, long, progress=False)
    assert ranks and 4 not in ranks
    assert fast[0] == pytest.approx(
        score_continuations(model, tokenizer, long, scorer="naive", progress=False)[0], abs=1e-5
    )
    assert short[0] == pytest.approx(
        score_continuations(model, tokenizer, REQUESTS[:1], scorer="naive", progress=False)[0], abs=1e-5
    )


def test_under_bf16_autocast_the_packed_path_runs_and_agrees_with_the_naive_scorer():
    """`evaluate(precision="bf16")` autocasts: the mask takes autocast's dtype and the scores stay within bf16
    rounding of the naive scorer's (same autocast)."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    model.set_attn_implementation("sdpa")
    ranks = decoder_masks(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = score_continuations(model, tokenizer, REQUESTS, progress=False)
        assert 4 in ranks
        naive = score_continuations(model, tokenizer, REQUESTS, scorer="naive", progress=False)
    for a, b in zip(naive, fast, strict=True):
        assert b == pytest.approx(a, abs=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_logsumexp_in_chunks_equals_a_float64_oracle(dtype):
    """Rows in cache-sized chunks (a 49k vocabulary: several chunks) give each row's log-sum-exp as one fp64
    reduction does, -inf entries included; a NaN in the last chunk is still caught by `target_logprobs`."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(23, 49_152, generator=generator) * 8).to(dtype)
    logits[3, 100:200] = float("-inf")  # no target there
    rows = packed_module._LOGSUMEXP_CHUNK_ELEMENTS // logits.shape[-1]
    assert 1 <= rows < logits.shape[0]  # the chunked branch runs
    wide = logits.double()
    peak = wide.max(dim=-1).values
    oracle = peak + (wide - peak[:, None]).exp().sum(dim=-1).log()
    got = packed_module.row_logsumexp(logits)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), oracle, atol=1e-5, rtol=0)
    targets = torch.arange(23) * 7
    expected = wide.gather(-1, targets[:, None])[:, 0] - oracle
    assert torch.allclose(
        packed_module.target_logprobs(logits, targets).double(), expected, atol=1e-5, rtol=0
    )
    logits[-1, 5] = float("nan")
    with pytest.raises(NonFiniteLogitsError):
        packed_module.target_logprobs(logits, targets)


def test_the_fast_scorer_with_one_row_per_logsumexp_chunk_equals_plain_forwards(monkeypatch):
    """The scorer's log-sum-exp split to one row per chunk (as for a large vocabulary) scores as before."""
    model = tiny_model("llama")
    monkeypatch.setattr(packed_module, "_LOGSUMEXP_CHUNK_ELEMENTS", 1)
    scores = score_continuations(model, tiny_tokenizer(), REQUESTS, batch_size=2, progress=False)
    for request, row in zip(REQUESTS, scores, strict=True):
        for continuation, score in zip(request.continuations, row, strict=True):
            assert score == pytest.approx(
                float(plain_logprobs(model, request.context, continuation).sum()), abs=1e-5
            )
