"""Head selection: L1 sparsity, HeadSelection.top/save/load/plot, random and probe methods, base untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lofit import LofitConfig, get_lofit_model
from lofit.adapters.heads import find_output_projections
from lofit.adapters.layer import LofitProjection
from lofit.selection.activations import text_head_activations
from lofit.selection.probe import fit_logistic_probes, probe_head_scores
from lofit.selection.ranking import HeadSelection, SelectionFileError, rank_heads
from lofit.selection.select import select_heads
from lofit.training.distributed import seed_everything
from tiny_models import tiny_model, tiny_tokenizer

RECORDS = [{"prompt": f"{a}{b}:", "completion": f"{(a * b) % 10}"} for a in range(5) for b in range(5)]
DPO_RECORDS = [{"prompt": f"{a}?", "chosen": f" {a}", "rejected": f" {a + 1}"} for a in range(8)]
LIVE = [(0, 1), (1, 2), (2, 0)]


def model_with_live_heads() -> torch.nn.Module:
    """Tiny llama (3 layers x 4 heads) whose W_O ignores every head but LIVE: those heads' A get no task gradient."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in range(3):
            weight = model.model.layers[layer].self_attn.o_proj.weight
            for head in range(4):
                if (layer, head) not in LIVE:
                    weight[:, head * 8 : (head + 1) * 8] = 0
    return model


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": model.training,
        "types": {n: type(m) for n, m in model.named_modules()},
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert not any(isinstance(m, LofitProjection) for m in model.modules())
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())
    assert after["grad"] == before["grad"] and after["training"] == before["training"]


def quiet(**kwargs):  # type: ignore[no-untyped-def]
    return {"progress": False, **kwargs}


# ------------------------------------------------------------------------------------ lofit
def test_l1_shrinks_unused_heads_and_keeps_the_heads_that_matter() -> None:
    tok = tiny_tokenizer()
    options = quiet(epochs=5, batch_size=5, lr=5e-2, init_std=0.05)
    sparse = select_heads(model_with_live_heads(), tok, RECORDS, l1=1e-3, **options)
    free = select_heads(model_with_live_heads(), tok, RECORDS, l1=0.0, **options)
    fresh = tiny_model("llama")
    seed_everything(42)  # what select_heads does right before it builds the adapter
    init = get_lofit_model(fresh, LofitConfig(heads=None, use_scale=True, use_offset=False, init_std=0.05))
    init_norms = torch.stack([v.scale.detach().norm(dim=-1) for v in init.adapter_vectors().values()])
    dead = torch.ones(3, 4, dtype=torch.bool)
    for layer, head in LIVE:
        dead[layer, head] = False
    # Without L1 a head that cannot affect the loss keeps its initial A exactly; with L1 it shrinks to ~0.
    assert torch.allclose(free.scores[dead], init_norms[dead])
    assert (sparse.scores[dead] < init_norms[dead] / 5).all()
    assert set(sparse.ranking[:3]) == set(LIVE)
    assert sparse.scores[dead].max() < 0.05 * sparse.scores[~dead].min()
    assert sparse.history is not None and len(sparse.history["steps"]) == 25
    assert sparse.history["steps"][0]["penalty"] > 0 and "penalty" not in free.history["steps"][0]


def test_select_heads_gives_the_base_model_back_bit_identical() -> None:
    base = tiny_model("gpt2")
    base.train()
    base.transformer.wte.weight.requires_grad_(False)
    before = snapshot(base)
    selection = select_heads(base, tiny_tokenizer(), RECORDS[:8], **quiet(epochs=1, batch_size=4))
    assert_unchanged(base, before)
    assert selection.method == "lofit" and selection.scores.shape == (3, 4)
    assert selection.metadata["settings"]["lr"] == 5e-3 and selection.metadata["settings"]["l1"] == 5e-4


def test_dpo_selection_runs_and_reports_rewards() -> None:
    base = tiny_model("qwen3")
    before = snapshot(base)
    selection = select_heads(
        base, tiny_tokenizer(), DPO_RECORDS, objective="dpo", **quiet(epochs=1, batch_size=4)
    )
    assert_unchanged(base, before)
    assert len(selection.ranking) == 12
    assert selection.history["steps"][0]["loss"] == pytest.approx(0.6931, abs=0.01)


def test_select_heads_rejects_bad_arguments() -> None:
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="method must be one of"):
        select_heads(tiny_model("llama"), tok, RECORDS, method="magic")
    wrapped = get_lofit_model(tiny_model("llama"), LofitConfig(heads={0: [0]}))
    with pytest.raises(TypeError, match="unload"):
        select_heads(wrapped, tok, RECORDS)
    with pytest.raises(TypeError, match="unknown training option"):
        select_heads(tiny_model("llama"), tok, RECORDS, learning_rate=1e-3)


# ----------------------------------------------------------------------------- HeadSelection
def selection_of(layers: int, heads: int, seed: int = 0) -> HeadSelection:
    scores = torch.rand(layers, heads, generator=torch.Generator().manual_seed(seed))
    return HeadSelection(scores, rank_heads(scores), "lofit", {"note": "test"})


def test_rank_heads_orders_by_score_then_tiebreak() -> None:
    scores = torch.tensor([[0.5, 0.9], [0.5, 0.1]])
    assert rank_heads(scores) == [(0, 1), (0, 0), (1, 0), (1, 1)]
    assert rank_heads(scores, torch.tensor([[0.3, 0.0], [0.2, 0.0]])) == [(0, 1), (1, 0), (0, 0), (1, 1)]


def test_top_k_counts_and_fractions() -> None:
    selection = selection_of(10, 10)
    for k in (1, 7, 100):
        heads = selection.top(k)
        assert sum(len(h) for h in heads.values()) == k
        assert {(layer, h) for layer, hs in heads.items() for h in hs} == set(selection.ranking[:k])
        assert all(hs == sorted(hs) for hs in heads.values()) and list(heads) == sorted(heads)
    assert sum(len(h) for h in selection.top(0.1).values()) == 10
    assert sum(len(h) for h in selection.top(1.0).values()) == 100
    small = selection_of(3, 4)  # 12 heads
    assert small.count(0.1) == 1 and small.count(0.125) == 2 and small.count(0.01) == 1  # round half up, >= 1
    assert small.top_heads(3) == small.ranking[:3]
    assert small.count(np.int64(4)) == 4 and small.count(np.float32(0.5)) == 6


@pytest.mark.parametrize("k", [0, -1, 101, 0.0, 1.5, -0.1, float("nan"), True, "3"])
def test_top_rejects_bad_k(k: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        selection_of(10, 10).top(k)  # type: ignore[arg-type]


def test_save_and_load_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    selection = selection_of(3, 4)
    selection.history = {"steps": [{"step": 1, "loss": 2.0}]}
    path = tmp_path / "heads.json"
    selection.save(path)
    loaded = HeadSelection.load(path)
    assert torch.equal(loaded.scores, selection.scores)
    assert loaded.ranking == selection.ranking and loaded.method == "lofit"
    assert loaded.metadata == {"note": "test"} and loaded.history == selection.history
    assert loaded.top(5) == selection.top(5)


def test_load_names_what_is_wrong(tmp_path) -> None:  # type: ignore[no-untyped-def]
    good = selection_of(3, 4).to_dict()
    cases = {
        "missing.json": None,
        "broken.json": "{not json",
        "format.json": {**good, "format": "other"},
        "version.json": {**good, "version": 99},
        "nofield.json": {k: v for k, v in good.items() if k != "ranking"},
        "duplicate.json": {**good, "ranking": [good["ranking"][0]] * 12},
        "shape.json": {**good, "scores": [[1.0, 2.0]]},
        "count.json": {**good, "num_heads": 5},
    }
    messages = {
        "missing.json": "no such head-selection file",
        "broken.json": "not valid JSON",
        "format.json": "not a head-selection file",
        "version.json": "version 99",
        "nofield.json": "missing field 'ranking'",
        "duplicate.json": "exactly once",
        "shape.json": "exactly once",
        "count.json": "num_heads=5",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(SelectionFileError, match=messages[name]):
            HeadSelection.load(path)


def test_plot_writes_a_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    selection = selection_of(3, 4)
    selection.plot(tmp_path / "heads.png", k=3)
    selection.plot(tmp_path / "plain.png")
    for name in ("heads.png", "plain.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------- random
def test_random_selection_is_seeded() -> None:
    tok = tiny_tokenizer()
    base = tiny_model("llama")
    before = snapshot(base)
    first = select_heads(base, tok, RECORDS, method="random", seed=1, lr=0.1, l1=0.01)
    again = select_heads(base, tok, RECORDS, method="random", seed=1)
    other = select_heads(base, tok, RECORDS, method="random", seed=2)
    assert first.ranking == again.ranking and first.ranking != other.ranking
    assert sorted(first.ranking) == [(layer, head) for layer in range(3) for head in range(4)]
    assert_unchanged(base, before)


# ------------------------------------------------------------------------------------ probe
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_head_activations_are_the_projection_input_at_the_last_token(arch: str) -> None:
    base = tiny_model(arch)
    tok = tiny_tokenizer()
    texts = ["Q: a A: b", "short", "a much longer text than the others"]
    geometry = find_output_projections(base)
    reference = []
    for text in texts:  # one unpadded forward per text, recording each layer's whole projection input
        inputs: dict[int, torch.Tensor] = {}
        handles = [
            base.get_submodule(site.name).register_forward_pre_hook(
                lambda _m, args, layer=site.layer, store=inputs: store.__setitem__(
                    layer, args[0][0, -1].clone()
                )
            )
            for site in geometry.sites
        ]
        with torch.no_grad():
            base(input_ids=torch.tensor([tok(text)["input_ids"]]))
        for handle in handles:
            handle.remove()
        reference.append(torch.stack([inputs[layer].view(4, -1) for layer in range(3)]))
    activations = text_head_activations(base, tok, texts, batch_size=2)
    assert activations.shape == (3, 3, 4, geometry.head_dim)
    assert torch.allclose(activations, torch.stack(reference), atol=1e-5)
    wrapped = get_lofit_model(base, LofitConfig(heads={1: [0, 1]}, init_std=0.5))
    edited = text_head_activations(wrapped, tok, texts)
    assert torch.allclose(edited[:, :2], activations[:, :2], atol=1e-5)  # z is read before the layer's edit
    assert not torch.allclose(edited[:, 2], activations[:, 2], atol=1e-3)  # later layers see the offsets


def lbfgs_logistic(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Independent solve of sklearn's objective (C=1): Σ log-loss + ½‖w‖², bias unpenalised, by L-BFGS."""
    w = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        z = features @ w + b
        loss = F.binary_cross_entropy_with_logits(z, labels.double(), reduction="sum") + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), float(b.detach())


def test_probe_solver_matches_an_independent_lbfgs_fit() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, 5, generator=generator)
    labels = (x[:, :, 0].sum(1) + 0.5 * torch.randn(60, generator=generator) > 0).long()
    fit = fit_logistic_probes(x, labels, l2=1.0)
    for probe in range(3):
        standardized = ((x[:, probe] - fit.mean[probe]) / fit.std[probe]).double()
        weight, bias = lbfgs_logistic(standardized, labels)
        assert torch.allclose(fit.weight[probe].double(), weight, atol=1e-4)
        assert float(fit.bias[probe]) == pytest.approx(bias, abs=1e-4)


def test_probe_ranks_the_informative_head_first() -> None:
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(80) % 2
    x = torch.randn(80, 2, 3, 4, generator=generator)
    x[:, 1, 2, 0] += 3.0 * (2 * labels - 1)  # head (1, 2) carries the label
    train, val = slice(0, 60), slice(60, 80)
    scores = probe_head_scores(x[train], labels[train], x[val], labels[val])
    assert scores.val_accuracy.shape == (2, 3)
    assert rank_heads(scores.val_accuracy, scores.val_loss)[0] == (1, 2)
    assert float(scores.val_accuracy[1, 2]) == 1.0


@pytest.mark.parametrize(("objective", "records"), [("sft", RECORDS), ("dpo", DPO_RECORDS)])
def test_probe_selection_on_a_model(objective: str, records: list[dict]) -> None:
    base = tiny_model("gpt_neox")
    before = snapshot(base)
    selection = select_heads(base, tiny_tokenizer(), records, method="probe", objective=objective, seed=3)
    assert_unchanged(base, before)
    assert selection.method == "probe" and selection.scores.shape == (3, 4)
    assert ((selection.scores >= 0) & (selection.scores <= 1)).all()
    assert sorted(selection.ranking) == [(layer, head) for layer in range(3) for head in range(4)]
    probe = selection.metadata["probe"]
    assert probe["num_train_examples"] + probe["num_val_examples"] == 2 * len(records)
    with_val = select_heads(
        base, tiny_tokenizer(), records[:6], method="probe", objective=objective, val_data=records[6:]
    )
    assert with_val.metadata["probe"]["num_val_examples"] == 2 * (len(records) - 6)


def test_probe_needs_two_different_sft_completions() -> None:
    same = [{"prompt": f"{i}", "completion": "x"} for i in range(4)]
    with pytest.raises(ValueError, match="two different completions"):
        select_heads(tiny_model("llama"), tiny_tokenizer(), same, method="probe")
