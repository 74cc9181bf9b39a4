"""The optimisations, each measured on its own: variants that change one knob of a reference method.

Variants are timed in a few interleaved sets (variants sharing a reference run together); each
optimisation is then a view: the row with the optimisation and the row(s) without it, from one set.
"""

from __future__ import annotations

from dataclasses import dataclass

from .methods import Method


@dataclass(frozen=True)
class Optimisation:
    """One optimisation: the set its variants were timed in, and (with it, without it) variant pairs."""

    key: str
    title: str
    note: str
    timed_in: str
    pairs: tuple[tuple[str, str], ...]


MEMORY_VARIANTS = (  # the variants whose point is (also) memory; CPU probes cost ~15 s each
    "upper_grads_to_layer0",
    "upper_full_logits",
    "upper_fp32_weights",
    "upper_ckpt_layers",
    "upper_ckpt_hf",
)


def ablation_sets(
    methods: dict[str, Method], train_attention: str, cpu_bf16: bool, dpo: bool, compile_: bool
) -> tuple[dict[str, list[Method]], list[Optimisation]]:
    """{set name: variants timed together} and the optimisation views over them."""
    upper = methods["lofit_offsets_upper"]
    spread = methods["lofit_offsets_spread"]
    step1 = methods["lofit_step1"]
    forward = methods["base_forward"]
    other_attention = "sdpa" if train_attention == "eager" else "eager"
    sets: dict[str, list[Method]] = {
        "upper": [
            upper,
            upper.with_changes(
                "upper_grads_to_layer0", "offsets upper, backward forced to layer 0", input_grads=True
            ),
            upper.with_changes(
                "upper_full_logits", "offsets upper, LM head at every position", scorer_mode="full"
            ),
            upper.with_changes(
                f"upper_{other_attention}",
                f"offsets upper, {other_attention} attention",
                attention=other_attention,
            ),
            forward,
            forward.with_changes(
                f"base_forward_{other_attention}",
                f"base forward, {other_attention} attention",
                attention=other_attention,
            ),
            upper.with_changes(
                "upper_ckpt_layers",
                "offsets upper, checkpointing per layer (non-reentrant)",
                checkpointing="layers",
            ),
            upper.with_changes(
                "upper_ckpt_hf", "offsets upper, checkpointing via HF enable", checkpointing="hf"
            ),
        ],
        "head_op": [
            step1,
            step1.with_changes("step1_head_loop", "step 1, per-head Python loop", head_op="loop"),
            spread,
            spread.with_changes("spread_head_loop", "offsets spread, per-head Python loop", head_op="loop"),
        ],
    }
    views = [
        Optimisation(
            "backward_stop",
            "Backward stops at the lowest adapted layer",
            "autograd never enters the layers below the lowest adapted head (base frozen, nothing there needs "
            "a gradient); the variant makes the embedding output require grad, as HF/PEFT helpers do",
            "upper",
            (("lofit_offsets_upper", "upper_grads_to_layer0"),),
        ),
        Optimisation(
            "scored_logits",
            "LM head only at scored positions",
            "TokenScorer 'gathered' runs the decoder body, gathers the positions whose next token is scored and "
            "applies the output embedding there only; 'full' computes the model's logits at every position",
            "upper",
            (("lofit_offsets_upper", "upper_full_logits"),),
        ),
        Optimisation(
            "attention",
            f"Attention kernel for training: {train_attention}",
            f"the training steps use the {train_attention} attention implementation; the variant uses "
            f"{other_attention} (inference and evaluation keep sdpa)",
            "upper",
            (
                ("lofit_offsets_upper", f"upper_{other_attention}"),
                ("base_forward", f"base_forward_{other_attention}"),
            ),
        ),
        Optimisation(
            "head_op",
            "Vectorised head op",
            "one broadcast multiply-add over the whole projection input (the per-head vectors scattered into a "
            "dense [heads*head_dim] vector) instead of a Python loop over the heads",
            "head_op",
            (("lofit_step1", "step1_head_loop"), ("lofit_offsets_spread", "spread_head_loop")),
        ),
        Optimisation(
            "checkpointing",
            "Gradient checkpointing (optional)",
            "'per layer' = non-reentrant checkpoint of each decoder layer, backward still stops at the lowest "
            "adapted layer; 'HF enable' = transformers' gradient_checkpointing_enable(), which also makes the "
            "embedding output require grad. HF layers checkpoint only in training mode (flagged here)",
            "upper",
            (("upper_ckpt_layers", "lofit_offsets_upper"), ("upper_ckpt_hf", "lofit_offsets_upper")),
        ),
    ]
    if cpu_bf16:  # bf16 weights + bf16 autocast on CPU: compare with fp32 weights and with plain fp32
        sets["upper"].append(
            upper.with_changes(
                "upper_fp32_weights", "offsets upper, fp32 frozen weights + bf16 autocast", weights="fp32"
            )
        )
        views.append(
            Optimisation(
                "bf16_weights",
                "Frozen base weights stored in bf16",
                "with fp32 weights, bf16 autocast re-casts every frozen weight matrix in every forward; the "
                "base never changes, so holding it in bf16 removes those casts (adapters stay fp32)",
                "upper",
                (("lofit_offsets_upper", "upper_fp32_weights"),),
            )
        )
        sets["fp32"] = [
            forward,
            forward.with_changes("base_forward_fp32", "base forward, fp32", precision="fp32", weights="fp32"),
            upper,
            upper.with_changes("upper_fp32", "offsets upper, fp32", precision="fp32", weights="fp32"),
        ]
        views.append(
            Optimisation(
                "bf16_autocast",
                "bf16 autocast on CPU",
                "bf16 (AMX / avx512_bf16 matmuls) against plain fp32 weights and compute",
                "fp32",
                (("base_forward", "base_forward_fp32"), ("lofit_offsets_upper", "upper_fp32")),
            )
        )
    if dpo:
        cached = upper.with_changes(
            "upper_dpo",
            "offsets upper, DPO, cached reference, random batches",
            data="dpo_random",
            objective="dpo",
        )
        sets["dpo"] = [
            cached,
            cached.with_changes(
                "upper_dpo_recompute", "offsets upper, DPO, reference every step", reference="recompute"
            ),
            cached.with_changes(
                "upper_dpo_grouped", "offsets upper, DPO, length-grouped batches", data="dpo_grouped"
            ),
        ]
        views += [
            Optimisation(
                "dpo_reference",
                "Cached DPO reference log-probs",
                "the frozen base model's log-probs of every pair are computed once before training instead of a "
                "second (no-grad) forward every step",
                "dpo",
                (("upper_dpo", "upper_dpo_recompute"),),
            ),
            Optimisation(
                "length_grouping",
                "Length-grouped batching",
                "records sorted by length within chunks of 50 batches, batches shuffled (trainer group_by_length); "
                "tokens/s counts real tokens only",
                "dpo",
                (("upper_dpo_grouped", "upper_dpo"),),
            ),
        ]
    if compile_:
        sets["compile"] = [
            upper,
            upper.with_changes("upper_compiled", "offsets upper, torch.compile", compile=True),
        ]
        views.append(
            Optimisation(
                "compile",
                "torch.compile (optional)",
                "every decoder layer compiled with torch.compile (inductor); compile time is in the warm-up",
                "compile",
                (("upper_compiled", "lofit_offsets_upper"),),
            )
        )
    return sets, views
