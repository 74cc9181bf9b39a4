"""The one-pass gradient selector: per-head scores against an independent autograd oracle and finite
differences, batch-size invariance, DPO without a reference pass, the base model handed back, the API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lofit import LofitConfig, get_lofit_model
from lofit.cli.main import main
from lofit.errors import LofitError
from lofit.selection.gradient import gradient_head_scores
from lofit.selection.ranking import HeadSelection
from lofit.selection.select import select_heads
from lofit.training.settings import TrainingConfig
from tiny_models import tiny_model, tiny_tokenizer

SFT = [{"prompt": f"{a}*{b}=", "completion": f"{(a * b) % 10}"} for a in range(4) for b in range(3)]
DPO = [{"prompt": f"{a}?", "chosen": f" {a}", "rejected": f" {a + 2}"} for a in range(7)]
LAYERS, HEADS, HEAD_DIM = 3, 4, 8


# ---------------------------------------------------------------------------------- the oracle
def _token_ids(text: str) -> list[int]:
    """The tiny tokenizer is one token per character, no BOS: ids written from its vocabulary."""
    vocab = tiny_tokenizer().get_vocab()
    return [vocab[ch] for ch in text]


def _sequence_logp(model: torch.nn.Module, prompt: str, response: str) -> torch.Tensor:
    """Summed log-prob of response + EOS given the prompt, one unpadded sequence through model(...)."""
    ids = torch.tensor([[*_token_ids(prompt + response), tiny_tokenizer().eos_token_id]])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].to(torch.float64), dim=-1)
    targets = ids[0, 1:]
    start = max(len(prompt), 1) - 1  # target index of the first response token
    return logps[start:].gather(1, targets[start:, None]).sum()


def _oracle_loss(
    model: torch.nn.Module,
    scale: torch.Tensor,
    objective: str,
    beta: float = 0.5,
    records: list | None = None,
) -> torch.Tensor:
    """Dataset-mean task loss of `model` whose o_proj inputs are multiplied by 1 + scale[layer] (hooks)."""
    handles = []
    for layer in range(LAYERS):
        factor = (1 + scale[layer]).flatten()

        def hook(module, args, factor=factor):  # type: ignore[no-untyped-def]
            return (args[0] * factor.to(args[0].dtype),)

        projection = model.model.layers[layer].self_attn.o_proj
        handles.append(projection.register_forward_pre_hook(hook))
    try:
        if objective == "sft":
            chosen = SFT if records is None else records
            logps = [_sequence_logp(model, r["prompt"], r["completion"]) for r in chosen]
            tokens = sum(len(r["completion"]) + 1 for r in chosen)  # completion characters + EOS
            return -torch.stack(logps).sum() / tokens
        pairs = [
            (
                _sequence_logp(model, r["prompt"], r["chosen"]),
                _sequence_logp(model, r["prompt"], r["rejected"]),
            )
            for r in DPO
        ]
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        reference = [
            (
                _sequence_logp(model, r["prompt"], r["chosen"]),
                _sequence_logp(model, r["prompt"], r["rejected"]),
            )
            for r in DPO
        ]
    margins = torch.stack(
        [(pc - rc) - (pr - rr) for (pc, pr), (rc, rr) in zip(pairs, reference, strict=True)]
    )
    return -F.logsigmoid(beta * margins).mean()


def _oracle_gradient_norms(objective: str) -> torch.Tensor:
    model = tiny_model("llama")
    scale = torch.zeros(LAYERS, HEADS, HEAD_DIM, requires_grad=True)
    (grad,) = torch.autograd.grad(_oracle_loss(model, scale, objective), scale)
    return grad.norm(dim=-1)


def _scores(objective: str, **options: object) -> tuple[torch.Tensor, dict]:
    records = SFT if objective == "sft" else DPO
    config = TrainingConfig(**{"batch_size": 4, **options})  # type: ignore[arg-type]
    return gradient_head_scores(tiny_model("llama"), tiny_tokenizer(), records, objective, config)


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_scores_equal_an_independent_autograd_oracle(objective: str) -> None:
    scores, info = _scores(objective)
    expected = _oracle_gradient_norms(objective)
    assert scores.shape == (LAYERS, HEADS) and info["passes"] == 1
    assert float(expected.min()) > 0  # every head of a random model matters a little
    torch.testing.assert_close(scores, expected.float(), rtol=1e-4, atol=1e-7)


def test_scores_match_central_finite_differences_in_float64() -> None:
    scores, _ = _scores("sft")
    # Llama's RMSNorm and eager softmax compute in fp32 even in an fp64 model, so the loss carries fp32
    # rounding: a step of 1e-3 keeps that noise and the O(eps^2) truncation error both near 1e-4 relative.
    model = tiny_model("llama").double()
    epsilon = 1e-3
    for layer, head in [(0, 1), (2, 3)]:
        grad = torch.zeros(HEAD_DIM, dtype=torch.float64)
        for j in range(HEAD_DIM):
            step = torch.zeros(LAYERS, HEADS, HEAD_DIM, dtype=torch.float64)
            step[layer, head, j] = epsilon
            with torch.no_grad():
                up, down = _oracle_loss(model, step, "sft"), _oracle_loss(model, -step, "sft")
            grad[j] = (up - down) / (2 * epsilon)
        assert float(scores[layer, head]) == pytest.approx(float(grad.norm()), rel=2e-3)


def test_score_is_batch_size_invariant_but_the_fisher_score_is_not() -> None:
    one, info_one = _scores("sft", batch_size=1)
    all_at_once, info_all = _scores("sft", batch_size=len(SFT))
    torch.testing.assert_close(one, all_at_once, rtol=1e-4, atol=1e-7)
    assert info_one["num_batches"] == len(SFT) and info_all["num_batches"] == 1
    # one batch: mean of ||g_b||^2 is ||g||^2 exactly
    torch.testing.assert_close(
        torch.tensor(info_all["fisher_scores"]), all_at_once.square(), rtol=1e-4, atol=1e-9
    )
    assert not torch.allclose(torch.tensor(info_one["fisher_scores"]), one.square(), rtol=1e-2)


def test_adam_score_equals_its_formula_on_independent_per_batch_gradients() -> None:
    """adam = ‖max(0, |ḡ| − λ) / √(mean_b m_b²)‖ per head, m_b each batch's mean-loss gradient (oracle)."""
    model = tiny_model("llama")
    per_batch = []
    for start in range(0, len(SFT), 4):
        scale = torch.zeros(LAYERS, HEADS, HEAD_DIM, requires_grad=True)
        loss = _oracle_loss(model, scale, "sft", records=SFT[start : start + 4])
        per_batch.append(torch.autograd.grad(loss, scale)[0])
    scale = torch.zeros(LAYERS, HEADS, HEAD_DIM, requires_grad=True)
    (mean,) = torch.autograd.grad(_oracle_loss(model, scale, "sft"), scale)
    l1 = float(mean.abs().median())  # half the elements fall below λ and count zero
    rms = torch.stack(per_batch).square().mean(0).sqrt()
    expected = ((mean.abs() - l1).clamp(min=0) / rms).norm(dim=-1)
    _, info = _scores("sft", batch_size=4, l1=l1)
    assert info["num_batches"] == 3 and info["adam_l1"] == l1
    torch.testing.assert_close(torch.tensor(info["adam_scores"]), expected.float(), rtol=1e-3, atol=1e-6)
    _, free = _scores("sft", batch_size=4, l1=0.0)  # without λ the score grows: no element is clipped
    assert bool((torch.tensor(free["adam_scores"]) >= torch.tensor(info["adam_scores"])).all())


def test_dead_heads_score_zero() -> None:
    """A head whose slice of W_O is zero cannot change the output: its gradient is exactly 0."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:, 2 * HEAD_DIM : 3 * HEAD_DIM] = 0
    scores, _ = gradient_head_scores(model, tiny_tokenizer(), SFT, "sft", TrainingConfig(batch_size=4))
    assert float(scores[1, 2]) == 0.0 and bool((scores.flatten().topk(11).values > 0).all())


def test_bf16_scores_close_to_fp32() -> None:
    fp32, _ = _scores("sft")
    bf16, info = _scores("sft", precision="bf16")
    assert info["gradient_precision"] == "bf16"
    torch.testing.assert_close(bf16, fp32, rtol=0.1, atol=1e-4)


# ------------------------------------------------------------------------------ select_heads API
def test_select_heads_gradient_hands_the_base_model_back() -> None:
    base = tiny_model("llama")
    base.train()
    base.lm_head.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    selection = select_heads(base, tiny_tokenizer(), SFT, method="gradient", batch_size=4, progress=False)
    assert isinstance(selection, HeadSelection) and selection.method == "gradient"
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags and base.training
    assert type(base.model.layers[0].self_attn.o_proj).__name__ == "Linear"
    expected, _ = _scores("sft")
    torch.testing.assert_close(selection.scores, expected)
    flat = selection.scores.flatten()
    assert selection.ranking[0] == divmod(int(flat.argmax()), HEADS)
    assert selection.metadata["gradient"]["passes"] == 1 and "gradient" in selection.metadata["score"]


def test_select_heads_gradient_round_trips_through_save(tmp_path: Path) -> None:
    selection = select_heads(tiny_model("llama"), tiny_tokenizer(), DPO, method="gradient", objective="dpo")
    selection.save(tmp_path / "heads.json")
    loaded = HeadSelection.load(tmp_path / "heads.json")
    assert loaded.method == "gradient" and loaded.ranking == selection.ranking
    assert loaded.top(0.25) == selection.top(0.25)


def test_bad_inputs_give_clear_errors() -> None:
    tok = tiny_tokenizer()
    wrapped = get_lofit_model(tiny_model("llama"), LofitConfig())
    with pytest.raises(TypeError, match="plain base model"):
        select_heads(wrapped, tok, SFT, method="gradient")
    with pytest.raises(LofitError, match="completion"):
        select_heads(tiny_model("llama"), tok, [{"prompt": "x"}], method="gradient")
    with pytest.raises(LofitError, match="chosen"):
        select_heads(tiny_model("llama"), tok, SFT, method="gradient", objective="dpo")
    with pytest.raises(TypeError, match="unknown training option"):
        select_heads(tiny_model("llama"), tok, SFT, method="gradient", epoch=1)


@pytest.mark.parametrize("method", ["gradient", "gradient-adam"])
def test_cli_select_method_gradient(tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str) -> None:
    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in SFT))
    out = tmp_path / "sel"
    args = ["select", "--task", "sft", "--model", str(model_dir), "--train", str(train), "--out", str(out)]
    code = main([*args, "--select-method", method, "--k", "2", "--no-progress", "--precision", "fp32"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "gradient head scores" not in err  # --no-progress
    saved = HeadSelection.load(out / "heads.json")
    assert saved.method == method
    assert main([*args, "--select-method", method, "--k", "2", "--precision", "fp32"]) == 0
    assert "gradient head scores" in capsys.readouterr().err  # the one pass shows a progress bar
    with pytest.raises(SystemExit):  # argparse's choices refuse an unknown method
        main([*args, "--select-method", "magic"])


def test_select_heads_gradient_adam_ranks_by_the_adam_score_of_the_same_pass(tmp_path: Path) -> None:
    plain = select_heads(tiny_model("llama"), tiny_tokenizer(), SFT, method="gradient", l1=1e-3)
    adam = select_heads(tiny_model("llama"), tiny_tokenizer(), SFT, method="gradient-adam", l1=1e-3)
    assert torch.equal(adam.scores, torch.tensor(plain.metadata["gradient"]["adam_scores"]))
    assert adam.ranking != plain.ranking  # a different ranking from the same numbers
    assert adam.method == "gradient-adam" and "l1" in adam.metadata["score"]
    adam.save(tmp_path / "heads.json")
    assert HeadSelection.load(tmp_path / "heads.json").ranking == adam.ranking


def test_gradient_adam_with_an_l1_that_silences_every_head_is_refused() -> None:
    with pytest.raises(LofitError, match=r"scored every head 0: l1=1e\+06 .* lower l1"):
        select_heads(tiny_model("llama"), tiny_tokenizer(), SFT, method="gradient-adam", l1=1e6)
