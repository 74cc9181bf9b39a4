"""Objectives: tokenisation boundary, batching, gathered logits, and oracle checks of the SFT and DPO losses."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch

from lofit import LofitConfig, get_lofit_model
from lofit.training.batching import collate
from lofit.training.encoding import SequenceEncoder
from lofit.training.logprobs import TokenScorer
from lofit.training.losses import DPOObjective, SFTObjective, dpo_losses, mean_loss
from tiny_models import ARCHITECTURES, tiny_model, tiny_tokenizer

SFT_RECORDS = [
    {"prompt": "Q: 2+3 A:", "completion": " 5"},
    {"prompt": "Q: 10+1 A:", "completion": " 11"},
    {"prompt": "Q: 7 A:", "completion": " seven!"},
]
DPO_RECORDS = [
    {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " green"},
    {"prompt": "Q: 1+1 A:", "chosen": " 2", "rejected": " three"},
]


def special_tokenizer(template: str):  # type: ignore[no-untyped-def]
    """The tiny char tokenizer plus a "<s>" token and a post-processor template such as "<s> $A"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "</s>", "<s>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )


class MergingTokenizer:
    """Greedy longest-match over a vocabulary with multi-character tokens (so BPE-like merges happen)."""

    vocab: ClassVar[dict[str, int]] = {"<pad>": 0, "</s>": 1, "a": 2, " ": 3, "b": 4, " b": 5, "c": 6}
    eos_token_id, pad_token_id = 1, 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids, i = [], 0
        while i < len(text):
            piece = text[i : i + 2] if text[i : i + 2] in self.vocab else text[i]
            ids.append(self.vocab[piece])
            i += len(piece)
        return {"input_ids": ids}


def char_ids(tokenizer, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------- encoding
def test_sft_boundary_without_bos() -> None:
    tok = tiny_tokenizer()
    seq = SequenceEncoder(tok).encode("Q: 2 A:", " 4")
    assert list(seq.input_ids) == [*char_ids(tok, "Q: 2 A:"), *char_ids(tok, " 4"), tok.eos_token_id]
    assert seq.response_start == len("Q: 2 A:")
    assert seq.num_targets == 3  # " ", "4", EOS


def test_sft_boundary_with_bos() -> None:
    tok = special_tokenizer("<s> $A")
    bos = tok.convert_tokens_to_ids("<s>")
    seq = SequenceEncoder(tok).encode("Q: 2 A:", " 4")
    assert list(seq.input_ids) == [bos, *char_ids(tok, "Q: 2 A:"), *char_ids(tok, " 4"), tok.eos_token_id]
    assert seq.response_start == 1 + len("Q: 2 A:")
    batch = collate([seq], pad_token_id=0)
    assert batch.targets.tolist() == [*char_ids(tok, " 4"), tok.eos_token_id]
    assert batch.positions.tolist() == [7, 8, 9]  # the token before each target


def test_tokenizer_that_appends_eos_gets_exactly_one() -> None:
    tok = special_tokenizer("$A </s>")
    seq = SequenceEncoder(tok).encode("ab", "c")
    assert list(seq.input_ids) == [*char_ids(tok, "abc"), tok.eos_token_id]
    assert seq.response_start == 2


def test_boundary_with_a_token_merged_across_prompt_and_response() -> None:
    tok = MergingTokenizer()
    # "a " + "b" tokenises as ["a", " b"]: the merged token " b" is scored as response.
    seq = SequenceEncoder(tok).encode("a ", "b")
    assert list(seq.input_ids) == [2, 5, 1]
    assert seq.response_start == 1


def test_empty_prompt_without_bos_scores_from_the_second_token() -> None:
    seq = SequenceEncoder(tiny_tokenizer()).encode("", "xy")
    assert seq.response_start == 1 and seq.num_targets == 2


def test_truncation_drops_prompt_from_the_left_and_keeps_bos() -> None:
    tok = special_tokenizer("<s> $A")
    bos = tok.convert_tokens_to_ids("<s>")
    encoder = SequenceEncoder(tok, max_length=6)
    seq = encoder.encode("0123456789", "ab")
    assert list(seq.input_ids) == [bos, *char_ids(tok, "89ab"), tok.eos_token_id]
    assert seq.response_start == 3
    long_response = encoder.encode("0123", "abcdefghij")
    assert list(long_response.input_ids) == [bos, *char_ids(tok, "abcde")]
    assert long_response.response_start == 1 and encoder.num_truncated == 2
    plain = SequenceEncoder(tiny_tokenizer(), max_length=4).encode("0123", "abcdefg")
    assert list(plain.input_ids) == char_ids(tiny_tokenizer(), "3abc") and plain.response_start == 1


def test_encoding_warns_about_truncated_sequences() -> None:
    objective = SFTObjective(tiny_tokenizer(), max_length=13)
    with pytest.warns(UserWarning, match="2 of 3 sequences exceed max_length=13"):
        examples = objective.encode(SFT_RECORDS)
    assert [len(e.sequences[0].input_ids) for e in examples] == [12, 13, 13]


def test_collate_pads_right_and_lists_scored_positions() -> None:
    tok = tiny_tokenizer()
    objective = SFTObjective(tok)
    examples = objective.encode(SFT_RECORDS)
    batch = objective.batch(examples)
    lengths = [len(e.sequences[0].input_ids) for e in examples]
    assert batch.input_ids.shape == (3, max(lengths))
    assert batch.attention_mask.sum(1).tolist() == lengths
    assert (batch.input_ids[batch.attention_mask == 0] == tok.pad_token_id).all()
    assert len(batch.targets) == sum(objective.units(e) for e in examples)
    assert (batch.input_ids[batch.sequence_index, batch.positions + 1] == batch.targets).all()


# ------------------------------------------------------------------------------ gathered logits
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gathered_logits_equal_full_logits(arch: str) -> None:
    base = tiny_model(arch)
    if arch == "gemma2":
        base.config.final_logit_softcapping = 0.5  # strong enough that forgetting the cap would show
    model = get_lofit_model(base, LofitConfig(heads={1: [0, 3]}, init_std=0.3))
    objective = SFTObjective(tiny_tokenizer())
    batch = objective.batch(objective.encode(SFT_RECORDS))
    with torch.no_grad():
        gathered = TokenScorer(model, "gathered").logits(batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(gathered, logits[batch.sequence_index, batch.positions], atol=1e-5, rtol=1e-5)
    assert TokenScorer(model, "auto").logits(batch).shape == gathered.shape


def test_auto_mode_falls_back_to_full_logits_when_the_head_differs() -> None:
    base = tiny_model("llama")
    base.config.final_logit_softcapping = 0.5  # llama's own forward ignores this, the gathered path would not
    scorer = TokenScorer(base, "auto")
    objective = SFTObjective(tiny_tokenizer())
    batch = objective.batch(objective.encode(SFT_RECORDS))
    with pytest.warns(UserWarning, match="computing full logits"):
        logits = scorer.logits(batch)
    assert scorer.mode == "full"
    full = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(logits, full[batch.sequence_index, batch.positions])


def autocast_head_oracle(base: torch.nn.Module, batch) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Gathered logits with the head called as a plain module under bf16 autocast (autocast's own cast)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = base.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
        return base.get_output_embeddings()(hidden[batch.sequence_index, batch.positions])


def test_gathered_logits_under_autocast_cast_the_frozen_head_once_and_equal_autocast() -> None:
    base = tiny_model("gemma3_text")  # tied embedding / LM head, scaled embedding
    base.config.final_logit_softcapping = None
    base.requires_grad_(False)
    objective = SFTObjective(tiny_tokenizer())
    batch = objective.batch(objective.encode(SFT_RECORDS))
    scorer = TokenScorer(base, "gathered")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = scorer.logits(batch)
        copy = scorer._head_cast._weight
        second = scorer.logits(batch)
    assert first.dtype == torch.bfloat16
    assert copy is not None and scorer._head_cast._weight is copy  # cast once, reused
    assert torch.equal(first, autocast_head_oracle(base, batch)) and torch.equal(second, first)
    with torch.no_grad():
        base.get_output_embeddings().weight.mul_(2.0)  # an in-place change makes a new copy
        with torch.autocast("cpu", dtype=torch.bfloat16):
            changed = scorer.logits(batch)
    assert scorer._head_cast._weight is not copy
    assert torch.equal(changed, autocast_head_oracle(base, batch))


def test_cast_head_gives_the_adapter_autocasts_gradients() -> None:
    base = tiny_model("gemma3_text")
    model = get_lofit_model(base, LofitConfig(heads={1: [0, 3]}, init_std=0.3))
    objective = SFTObjective(tiny_tokenizer())
    batch = objective.batch(objective.encode(SFT_RECORDS))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for cached in (True, False):
        scorer = TokenScorer(model, "gathered")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = scorer.logits(batch) if cached else autocast_head_oracle(base, batch)
            if scorer.causal_lm.config.final_logit_softcapping is not None and not cached:
                cap = scorer.causal_lm.config.final_logit_softcapping
                logits = torch.tanh(logits / cap) * cap
        grads.append(torch.autograd.grad(logits.float().sum(), params))
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


# ------------------------------------------------------------------------------------ oracles
def hand_logps(model: torch.nn.Module, ids: list[int], start: int) -> float:
    """Σ log p(ids[j] | ids[:j]) for j >= start, from one unpadded full-logits forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = logits.log_softmax(-1)
    return sum(float(logp[j - 1, ids[j]]) for j in range(start, len(ids)))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_sft_loss_equals_hand_computation(arch: str) -> None:
    tok = tiny_tokenizer()
    model = get_lofit_model(tiny_model(arch), LofitConfig(heads={0: [1], 2: [2]}, init_std=0.3))
    total, count = 0.0, 0
    for record in SFT_RECORDS:
        prompt = char_ids(tok, record["prompt"])
        ids = prompt + char_ids(tok, record["completion"]) + [tok.eos_token_id]
        total += hand_logps(model, ids, len(prompt))
        count += len(ids) - len(prompt)
    expected = -total / count
    objective = SFTObjective(tok)
    examples = objective.encode(SFT_RECORDS)
    out = objective.loss(TokenScorer(model), examples, "cpu")
    assert out.units == count
    assert float(out.loss_sum.detach()) / out.units == pytest.approx(expected, rel=1e-5)
    assert mean_loss(objective, TokenScorer(model), examples, 2, "cpu")["loss"] == pytest.approx(
        expected, rel=1e-5
    )


def test_dpo_losses_formula() -> None:
    pc, pr, rc, rr = (torch.randn(5, dtype=torch.float64) * 3 for _ in range(4))
    beta = 0.7
    expected = [
        -math.log(1 / (1 + math.exp(-beta * ((a - c) - (b - d)))))
        for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True)
    ]
    assert dpo_losses(pc, pr, rc, rr, beta).tolist() == pytest.approx(expected, rel=1e-12)


def test_dpo_loss_equals_hand_computation_for_two_pairs() -> None:
    tok = tiny_tokenizer()
    model = get_lofit_model(tiny_model("qwen2"), LofitConfig(heads={1: [0, 1, 2]}, init_std=0.5))
    beta = 0.5
    hand = []
    for record in DPO_RECORDS:
        prompt = char_ids(tok, record["prompt"])
        seqs = [prompt + char_ids(tok, record[k]) + [tok.eos_token_id] for k in ("chosen", "rejected")]
        policy = [hand_logps(model, s, len(prompt)) for s in seqs]
        with model.disable_adapter():
            reference = [hand_logps(model, s, len(prompt)) for s in seqs]
        x = beta * ((policy[0] - reference[0]) - (policy[1] - reference[1]))
        assert abs(x) > 1e-3  # the adapter moves the policy away from the reference
        hand.append(-math.log(1 / (1 + math.exp(-x))))
    objective = DPOObjective(tok, beta=beta)
    examples = objective.encode(DPO_RECORDS)
    scorer = TokenScorer(model)
    objective.prepare(scorer, examples, batch_size=1, device="cpu")
    out = objective.loss(scorer, examples, "cpu")
    assert out.units == 2
    assert float(out.loss_sum.detach()) / 2 == pytest.approx(sum(hand) / 2, rel=1e-5)
    assert model.adapter_parameters()[0].requires_grad  # prepare() left the adapter switched on
    out.loss_sum.backward()
    assert model.adapter_parameters()[0].grad is not None


def test_dpo_loss_is_log2_when_policy_equals_reference() -> None:
    model = get_lofit_model(tiny_model("llama"), LofitConfig(heads={0: [0]}, init_std=0.0))
    objective = DPOObjective(tiny_tokenizer(), beta=0.5)
    examples = objective.encode(DPO_RECORDS)
    scorer = TokenScorer(model)
    objective.prepare(scorer, examples, batch_size=4, device="cpu")
    assert float(objective.loss(scorer, examples, "cpu").loss_sum.detach()) / 2 == pytest.approx(
        math.log(2), abs=1e-6
    )
