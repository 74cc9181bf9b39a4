"""Smoke and oracle tests of `benchmarks.speed`'s pieces on a tiny random llama (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchmarks.speed import knobs, targets
from benchmarks.speed import report as report_mod
from benchmarks.speed.ablations import ablation_sets
from benchmarks.speed.inference import inference_models, measure_inference
from benchmarks.speed.methods import Bench, Method, main_methods
from benchmarks.speed.timing import batch_tokens, time_interleaved

from lofit.training import EncodedSequence, Example

TINY = targets.TARGETS["tiny"]
LAYERS, HEADS = TINY.llama["num_hidden_layers"], TINY.llama["num_attention_heads"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and the speed benchmark sets 1 thread itself); restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_bench(seed: int = 0) -> tuple[Bench, dict[str, Method]]:
    torch.manual_seed(seed)
    model, tokenizer = targets.build_model(TINY, seed)
    heads = targets.standard_head_sets(LAYERS, HEADS, 4)
    bench = Bench.build(model, tokenizer, heads, None)
    bench.data["sft"] = targets.batches_of(targets.sft_examples(TINY, tokenizer, 8, None), 4)
    return bench, {m.name: m for m in main_methods(heads, True, True)}


# ---------------------------------------------------------------------------------- head sets
def test_evenly_spaced_heads_cover_the_layer_range() -> None:
    spread = targets.evenly_spaced_heads(range(30), 9, 27)
    assert sum(len(h) for h in spread.values()) == 27
    assert spread[0] == [0]  # the first head of the first layer: backward must reach layer 0
    upper = targets.evenly_spaced_heads(range(15, 30), 9, 27)
    assert min(upper) == 15 and max(upper) <= 29
    assert sum(len(h) for h in upper.values()) == 27
    with pytest.raises(ValueError, match="do not fit"):
        targets.evenly_spaced_heads(range(2), 2, 5)


def test_head_count_and_description() -> None:
    assert targets.head_count(30, 9, 0.1) == 27
    assert targets.head_count(32, 32, 0.1) == 102
    assert targets.describe_heads({3: [1], 7: [0, 2]}) == {
        "count": 3,
        "layers": 2,
        "lowest_layer": 3,
        "highest_layer": 7,
    }


def test_heads_from_file_reads_pairs_and_selections(tmp_path: Path) -> None:
    from lofit.selection.ranking import HeadSelection

    pairs = tmp_path / "heads.json"
    pairs.write_text(json.dumps({"heads": [[2, 1], [0, 3], [2, 0]]}))
    assert targets.heads_from_file(pairs, 99) == {0: [3], 2: [0, 1]}
    scores = torch.tensor([[0.1, 0.9], [0.5, 0.2]])
    selection = HeadSelection(scores, [(0, 1), (1, 0), (1, 1), (0, 0)], "lofit")
    path = tmp_path / "selection.json"
    selection.save(path)
    assert targets.heads_from_file(path, 2) == {0: [1], 1: [0]}


def test_random_examples_score_the_tail() -> None:
    examples = targets.random_examples(3, 16, 50, 0.25, seed=1)
    assert all(e.num_tokens == 16 and e.sequences[0].response_start == 12 for e in examples)
    assert all(3 <= t < 50 for e in examples for t in e.sequences[0].input_ids)


def test_batch_tokens_counts_padding() -> None:
    batch = [Example(0, (EncodedSequence((1, 2, 3), 1),)), Example(1, (EncodedSequence((1, 2, 3, 4, 5), 1),))]
    assert batch_tokens(batch) == (8, 10)


# ------------------------------------------------------------------------------------ methods
def test_each_method_trains_only_its_own_parameters() -> None:
    bench, methods = make_bench()
    all_params = dict(bench.model.named_parameters())
    for method in methods.values():
        before = {n: p.detach().clone() for n, p in all_params.items()}
        with bench.active(method) as params:
            trainable = {n for n, p in all_params.items() if p.requires_grad}
            assert trainable == {n for n, p in all_params.items() if any(p is q for q in params)}
            bench.step_fn(method, params)(bench.data["sft"][0])
            changed = {n for n, p in all_params.items() if not torch.equal(p, before[n])}
        after = {n for n, p in all_params.items() if not torch.equal(p, before[n])}
        if method.kind == "forward":
            assert not changed
        elif method.full:
            assert changed and not after  # full fine-tuning is undone on exit
        else:
            assert changed and changed <= trainable
            assert all("lora_" in n for n in changed) if method.lora else all("lofit" in n for n in changed)
        assert not any(p.requires_grad for p in all_params.values())


def test_all_off_is_the_base_model_exactly() -> None:
    torch.manual_seed(0)
    plain, _ = targets.build_model(TINY, seed=0)
    ids = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
    bench, methods = make_bench(seed=0)
    with bench.active(methods["base_forward"]), torch.no_grad():
        got = bench.model(input_ids=ids).logits
    assert torch.equal(got, expected)
    with bench.active(methods["lora"]), torch.no_grad():  # LoRA B = 0 at init: still the base model
        assert torch.equal(bench.model(input_ids=ids).logits, expected)
    with bench.active(methods["lofit_offsets_spread"]), torch.no_grad():  # offsets ~ N(0, 1e-3)
        assert not torch.equal(bench.model(input_ids=ids).logits, expected)


def layer_backward_calls(bench: Bench, method: Method) -> list[int]:
    """How many times autograd ran backward through each decoder layer's MLP in one step."""
    calls = [0] * LAYERS
    handles = [
        layer.mlp.register_full_backward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(knobs.decoder_layers(bench.model))
    ]
    try:
        with bench.active(method) as params:
            bench.step_fn(method, params)(bench.data["sft"][0])
    finally:
        for handle in handles:
            handle.remove()
    return calls


def test_backward_stops_at_the_lowest_adapted_layer() -> None:
    bench, methods = make_bench()
    upper = methods["lofit_offsets_upper"]
    lowest = min(layer for layer, heads in bench.lofit.selected_heads("offsets_upper").items() if heads)
    assert lowest == LAYERS // 2
    # The lowest adapted layer's own MLP runs after its o_proj, so it sits in the graph; lower ones do not.
    assert layer_backward_calls(bench, upper) == [0] * lowest + [1] * (LAYERS - lowest)
    forced = upper.with_changes("forced", "forced", input_grads=True)
    assert layer_backward_calls(bench, forced) == [1] * LAYERS
    assert layer_backward_calls(bench, methods["lora"]) == [1] * LAYERS


def test_loop_head_op_matches_the_vectorised_layer() -> None:
    """Oracle for the layer's math: the naive per-head loop gives the same output."""
    bench, methods = make_bench()
    ids = torch.randint(3, 256, (2, 10))
    for name in ("lofit_step1", "lofit_offsets_spread"):
        for vectors in bench.lofit.adapter_vectors(methods[name].lofit_adapter).values():
            for param in (vectors.scale, vectors.offset):
                if param is not None:
                    param.data.normal_(0, 0.3)
        with bench.active(methods[name]), torch.no_grad():
            vectorised = bench.model(input_ids=ids).logits
            with knobs.head_op("loop"):
                looped = bench.model(input_ids=ids).logits
        torch.testing.assert_close(looped, vectorised, rtol=1e-5, atol=1e-5)
        assert not torch.equal(vectorised, bench.model(input_ids=ids).logits)  # adapters off again


def test_knobs_restore_the_model() -> None:
    bench, methods = make_bench()
    weights = [p.detach().clone() for p in bench.base_parameters()]
    variant = methods["lofit_offsets_upper"].with_changes(
        "all_knobs",
        "all knobs",
        scorer_mode="full",
        input_grads=True,
        checkpointing="layers",
        head_op="loop",
        attention="eager",
        weights="fp32",
    )
    with bench.active(variant) as params:
        assert bench.scorer.mode == "full"
        assert bench.model.config._attn_implementation == "eager"
        assert all(p.dtype == torch.float32 for p in bench.base_parameters())
        bench.step_fn(variant, params)(bench.data["sft"][0])
    assert bench.scorer.mode == "gathered"
    assert bench.model.config._attn_implementation == "sdpa"
    assert all(torch.equal(a, b) for a, b in zip(bench.base_parameters(), weights, strict=True))
    assert not any(layer.gradient_checkpointing for layer in knobs.decoder_layers(bench.model))
    assert not any("forward" in vars(layer) for layer in knobs.decoder_layers(bench.model))
    assert not bench.model.training


def test_checkpointing_gives_the_same_gradients() -> None:
    bench, methods = make_bench()
    upper = methods["lofit_offsets_upper"]
    grads = {}
    for how in ("off", "layers", "hf"):
        variant = upper.with_changes(how, how, checkpointing=how)
        with bench.active(variant) as params:
            out = bench.objectives["sft"].loss(bench.scorer, bench.data["sft"][0], bench.device)
            out.loss_sum.backward()
            grads[how] = [p.grad.clone() for p in params]
    for how in ("layers", "hf"):
        for a, b in zip(grads[how], grads["off"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_recomputed_dpo_reference_equals_the_cached_one() -> None:
    bench, methods = make_bench()
    pairs = [
        Example(i, (EncodedSequence((5, 6, 7, 8 + i), 2), EncodedSequence((5, 6, 9, 10, 11 + i), 2)))
        for i in range(4)
    ]
    bench.data["dpo_random"] = [pairs]
    bench.cache_references("dpo_random")
    upper = methods["lofit_offsets_upper"]
    with bench.active(upper):
        cached = bench.objectives["dpo"].loss(bench.scorer, pairs, bench.device).loss_sum
        fresh = [Example(e.index, e.sequences) for e in pairs]
        recomputed = bench.objectives["dpo_recompute"].loss(bench.scorer, fresh, bench.device).loss_sum
    torch.testing.assert_close(recomputed, cached, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- timing
def test_time_interleaved_times_every_method_every_round() -> None:
    bench, methods = make_bench()
    chosen = [methods["base_forward"], methods["lofit_offsets_upper"], methods["lora"]]
    order: list[str] = []
    timings = time_interleaved(bench, chosen, rounds=2, steps=2, warmup=1, log=order.append)
    for timing in timings.values():
        assert len(timing.seconds) == len(timing.tokens) == 4
        assert all(t == 4 * TINY.seq_len for t in timing.tokens)
        assert timing.tokens_per_s() > 0 and timing.padding_fraction == 0
    assert len(order) == 3 + 2  # one warm-up line per method, one line per round


def test_ablation_views_refer_to_timed_variants() -> None:
    _, methods = make_bench()
    sets, views = ablation_sets(methods, "eager", cpu_bf16=True, dpo=True, compile_=True)
    for view in views:
        names = {m.name for m in sets[view.timed_in]}
        for with_name, without_name in view.pairs:
            assert {with_name, without_name} <= names, view.key
    assert {v.key for v in views} >= {
        "backward_stop",
        "scored_logits",
        "head_op",
        "checkpointing",
        "dpo_reference",
        "length_grouping",
        "bf16_weights",
        "bf16_autocast",
        "compile",
        "attention",
    }


def test_inference_models_merge_exactly() -> None:
    bench, methods = make_bench()
    with bench.active(methods["lofit_offsets_spread"]) as params:
        bench.step_fn(methods["lofit_offsets_spread"], params)(bench.data["sft"][0])
    models = inference_models(bench, "offsets_spread", torch.float32)
    results, checks = measure_inference(
        models, bench.data["sft"][0], 2, 8, 3, 0, bench.device, repeats=1, log=lambda _: None
    )
    assert checks["merged_vs_unmerged_max_abs_logit_diff"] < 1e-4
    assert checks["adapter_vs_base_max_abs_logit_diff"] > 1e-4
    assert [r.workload for r in results] == ["score", "generate"]
    assert results[1].tokens == 2 * 3
    assert set(results[0].to_dict()["speed_vs_base"]) == {
        "unmerged",
        "merged",
        "base_no_hook",
        "base_again",
        "base_trainable",
    }
    assert all(len(times) == 6 for times in results[0].seconds.values())  # one full rotation
    merged_biases = [n for n, m in models["merged"].named_modules() if getattr(m, "bias", None) is not None]
    assert merged_biases and all(n.endswith("o_proj") for n in merged_biases)  # the offsets only
    head = models["base"].get_output_embeddings()
    assert head._forward_pre_hooks  # restored after each call of the variant without it
    assert not any(p.requires_grad for p in models["base"].parameters())  # restored after each call


# ------------------------------------------------------------------------------------- report
def fake_report(upper: float, spread: float, step1: float, memory: float) -> dict:
    def row(name: str, tps: float, peak: int) -> dict:
        return {
            "name": name,
            "label": name,
            "tokens_per_s": tps,
            "tokens_per_s_min": tps,
            "tokens_per_s_max": tps,
            "peak_bytes": peak,
            "base_bytes": 100,
            "memory_how": "x",
            "padding_fraction": 0.0,
            "clock": "wall",
            "rounds": [0, 1],
            "tokens": [tps, 2 * tps],
            "seconds": [1.0, 2.0],
            "cpu_seconds": [1.0, 2.0],
        }

    lora_peak = 1000
    return {
        "main": {
            "lora": row("lora", 100.0, lora_peak),
            "lofit_offsets_upper": row("u", 100 * upper, int(lora_peak * memory)),
            "lofit_offsets_spread": row("s", 100 * spread, lora_peak),
            "lofit_step1": row("1", 100 * step1, lora_peak),
        },
        "inference": {
            "workloads": [
                {"workload": "score", "speed_vs_base": {"unmerged": 0.98, "merged": 0.99, "base_again": 1.0}}
            ]
        },
        "eval": {"speedup": 3.5, "questions": 20},
    }


def test_checks_apply_the_thresholds() -> None:
    met = [r["met"] for r in report_mod.checks(fake_report(1.6, 1.15, 1.05, 0.7))]
    assert met == [True, True, True, True, True, True]
    missed = [r["met"] for r in report_mod.checks(fake_report(1.6, 1.05, 0.95, 0.85))]
    assert missed == [False, False, False, True, True, True]


def test_speed_script_runs_end_to_end_on_a_tiny_model(tmp_path: Path) -> None:
    from benchmarks.speed import run as speed

    report = speed.main(["--target", "tiny", "--out", str(tmp_path), "--skip", "memory", "--rounds", "1"])
    assert {
        "base_forward",
        "lofit_step1",
        "lofit_offsets_upper",
        "lofit_offsets_spread",
        "lora",
        "full_ft",
    } <= set(report["main"])
    assert report["inference"]["checks"]["merged_vs_unmerged_max_abs_logit_diff"] < 1e-4
    text = (tmp_path / "speed.md").read_text()
    assert "## Target `tiny`" in text and "| criterion | measured | met |" in text
    saved = json.loads((tmp_path / "speed_tiny.json").read_text())
    assert saved["main"]["lora"]["steps_timed"] == 1


def test_memory_probe_runs_in_a_fresh_process(tmp_path: Path) -> None:
    from benchmarks.speed import run as speed

    args = speed.parse_args(["--target", "tiny"])
    args.threads = 1
    heads = targets.standard_head_sets(LAYERS, HEADS, 4)
    upper = next(m for m in main_methods(heads, False, False) if m.name == "lofit_offsets_upper")
    memory = speed.cpu_memory(args, [upper], heads)
    peak, after_setup, how = memory["lofit_offsets_upper"]
    assert peak >= after_setup > 50 * 2**20 and "VmHWM" in how


# ------------------------------------------------------------------- layer: no-grad dense cache
def test_inference_cache_follows_every_change_of_the_vectors() -> None:
    from lofit.adapters.config import LofitConfig
    from lofit.adapters.model import get_lofit_model

    torch.manual_seed(0)
    base, _ = targets.build_model(TINY, seed=0)
    model = get_lofit_model(base, LofitConfig(heads={0: [1], 2: [0, 3]}, use_scale=True, use_offset=True))
    ids = torch.randint(3, 256, (2, 9))

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            cached = model(input_ids=ids).logits
            cached_again = model(input_ids=ids).logits  # served from the cache
        fresh = model(input_ids=ids).logits.detach()  # grad mode: always rebuilt
        assert torch.equal(cached, cached_again)
        return cached, fresh

    cached, fresh = both()
    torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
    optimizer = torch.optim.SGD(model.adapter_parameters(), lr=1.0)
    model(input_ids=ids).logits.sum().backward()
    optimizer.step()  # in-place update: the cache must notice
    updated, fresh = both()
    assert not torch.equal(updated, cached)
    torch.testing.assert_close(updated, fresh, rtol=0, atol=0)
    params = model.get_head_params()
    params[(2, 3)]["offset"] = torch.full((TINY.llama["hidden_size"] // HEADS,), 0.5)
    model.set_head_params(params)
    changed, fresh = both()
    assert not torch.equal(changed, updated)
    torch.testing.assert_close(changed, fresh, rtol=0, atol=0)
    model.to(torch.bfloat16)  # activations change dtype: a new cache entry
    bf16, fresh = both()
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16, fresh, rtol=0, atol=0)
