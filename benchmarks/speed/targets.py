"""What `benchmarks.speed` measures on: the target's model, its token batches and the head sets.

Targets: "cpu" is the bundled SmolLM2-135M-Instruct (fp32 weights, bf16 autocast) on TruthfulQA-like
text; "gpu" a Llama-2-7B-shaped llama with random weights (bf16) on random tokens; "tiny" a few-layer
random llama for smoke tests. Every method sees the same batches and the same head counts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from lofit.training import EncodedSequence, Example

from ..harness.internals import HeadMap


@dataclass(frozen=True)
class Target:
    """One benchmark target: model, precision and batch shape."""

    name: str
    model: str  # "smollm2-135m" (bundled) or "random-llama"
    device: str
    weight_dtype: torch.dtype  # dtype the model's weights are stored in
    autocast: torch.dtype | None  # autocast dtype of training/forward steps (None = off)
    batch_size: int
    seq_len: int
    scored_fraction: float  # random-token targets: the last fraction of each sequence is scored
    head_fraction: float = 0.1  # K = this fraction of all heads, for every offset head set
    llama: dict[str, int] = field(default_factory=dict)  # LlamaConfig sizes for random models
    full_finetune: bool = False
    train_attention: str = "sdpa"  # attention implementation of the training/forward steps
    # inference: scoring batch = batch_size x seq_len; generation = gen_batch x gen_prompt + gen_new
    gen_batch: int = 8
    gen_prompt: int = 64
    gen_new: int = 32

    def with_overrides(self, **changes: Any) -> Target:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)

TARGETS: dict[str, Target] = {
    "cpu": Target(
        "cpu",
        "smollm2-135m",
        "cpu",
        torch.bfloat16,
        torch.bfloat16,
        batch_size=8,
        seq_len=128,
        scored_fraction=0.0,
        full_finetune=True,
        train_attention="eager",
        gen_batch=4,
        gen_prompt=32,
        gen_new=16,
    ),
    "gpu": Target(
        "gpu",
        "random-llama",
        "cuda",
        torch.bfloat16,
        torch.bfloat16,
        batch_size=8,
        seq_len=512,
        scored_fraction=0.125,
        llama=LLAMA2_7B,
        gen_batch=8,
        gen_prompt=512,
        gen_new=32,
    ),
    "tiny": Target(
        "tiny",
        "random-llama",
        "cpu",
        torch.float32,
        None,
        batch_size=4,
        seq_len=32,
        scored_fraction=0.25,
        head_fraction=0.25,
        llama=TINY_LLAMA,
        full_finetune=True,
        gen_batch=2,
        gen_prompt=8,
        gen_new=4,
    ),
}


# ------------------------------------------------------------------------------------ models
def build_model(target: Target, seed: int = 0) -> tuple[nn.Module, Any]:
    """The target's causal LM (eval mode, on its device) and tokenizer (a stub for random models)."""
    if target.model == "smollm2-135m":
        from lofit import load_model

        model, tokenizer = load_model("smollm2-135m", dtype=target.weight_dtype)
        model.to(target.device)
    else:
        model = random_llama(target.llama, target.weight_dtype, target.device, seed)
        tokenizer = SimpleNamespace(eos_token_id=2, pad_token_id=0, bos_token_id=1)
    model.eval()
    return model, tokenizer


def random_llama(sizes: dict[str, int], dtype: torch.dtype, device: str, seed: int = 0) -> nn.Module:
    """A llama with random weights built from a config, initialised directly on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    options: dict[str, Any] = dict(
        sizes,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    config = LlamaConfig(**options)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in bf16 directly: no 27 GB fp32 7B model to build and cast
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


# -------------------------------------------------------------------------------------- data
def truthfulqa_sft_records(data_root: Path | None, count: int, seed: int = 0) -> list[dict[str, str]]:
    """TruthfulQA-like SFT records: instruction + 6-shot primer + "Q: ...\\nA:" and the best answer."""
    from ..harness.internals import benchmark_dir

    data_dir = benchmark_dir("truthfulqa", data_root)
    instruction = (data_dir / "instruction_prompt.txt").read_text().strip()
    primer = (data_dir / "qa_primer.txt").read_text().strip()
    rows = [json.loads(line) for line in (data_dir / "truthfulqa.jsonl").read_text().splitlines() if line]
    random.Random(seed).shuffle(rows)
    records = []
    for row in rows[:count]:
        question = row.get("question") or row.get("Question")
        answer = row.get("best_answer") or row.get("Best Answer")
        records.append(
            {
                "prompt": f"{instruction}\n\n{primer}\n\nQ: {question}\nA:",
                "completion": f" {answer}",
            }
        )
    return records


def sft_examples(
    target: Target, tokenizer: Any, count: int, data_root: Path | None, seed: int = 0
) -> list[Example]:
    """`count` SFT examples of exactly `target.seq_len` tokens (real text on the bundled model)."""
    if target.model == "smollm2-135m":
        import warnings

        from lofit.training import SFTObjective

        objective = SFTObjective(tokenizer, max_length=target.seq_len)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # prompts are cut from the left to seq_len on purpose
            examples = objective.encode(truthfulqa_sft_records(data_root, count, seed))
        short = [e for e in examples if e.num_tokens != target.seq_len]
        if short:
            raise RuntimeError(f"{len(short)} TruthfulQA-like sequences are shorter than {target.seq_len}")
        return examples
    return random_examples(
        count, target.seq_len, int(target.llama["vocab_size"]), target.scored_fraction, seed
    )


def random_examples(
    count: int, length: int, vocab: int, scored_fraction: float, seed: int = 0
) -> list[Example]:
    """Random-token SFT examples whose last `scored_fraction` of tokens are scored."""
    generator = torch.Generator().manual_seed(seed)
    start = max(1, length - max(1, round(scored_fraction * length)))
    ids = torch.randint(3, vocab, (count, length), generator=generator)
    return [Example(i, (EncodedSequence(tuple(row.tolist()), start),)) for i, row in enumerate(ids)]


def batches_of(examples: list[Example], batch_size: int) -> list[list[Example]]:
    return [examples[i : i + batch_size] for i in range(0, len(examples) - batch_size + 1, batch_size)]


# --------------------------------------------------------------------------------- head sets
def evenly_spaced_heads(layers: range, num_heads: int, k: int) -> HeadMap:
    """`k` heads spread evenly over `layers` (row-major order), the first head of the first layer included."""
    cells = [(layer, head) for layer in layers for head in range(num_heads)]
    if not 1 <= k <= len(cells):
        raise ValueError(f"k={k} heads do not fit in {len(cells)} heads of layers {layers}")
    picked = sorted({cells[(i * len(cells)) // k] for i in range(k)})
    heads: HeadMap = {}
    for layer, head in picked:
        heads.setdefault(layer, []).append(head)
    return heads


def head_count(num_layers: int, num_heads: int, fraction: float) -> int:
    return max(1, round(fraction * num_layers * num_heads))


def standard_head_sets(num_layers: int, num_heads: int, k: int) -> dict[str, HeadMap]:
    """The offset head sets every target has: upper half of the layers, and spread down to layer 0."""
    return {
        "upper": evenly_spaced_heads(range(num_layers // 2, num_layers), num_heads, k),
        "spread": evenly_spaced_heads(range(num_layers), num_heads, k),
    }


def heads_from_file(path: Path, k: int) -> HeadMap:
    """Top-`k` heads of a saved `HeadSelection`, or all heads of a JSON list of [layer, head] pairs."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "ranking" in data:
        from lofit import HeadSelection

        return HeadSelection.load(path).top(k)
    pairs = data.get("heads", data) if isinstance(data, dict) else data
    heads: HeadMap = {}
    for layer, head in pairs:
        heads.setdefault(int(layer), []).append(int(head))
    return {layer: sorted(h) for layer, h in sorted(heads.items())}


def describe_heads(heads: HeadMap) -> dict[str, Any]:
    layers = sorted(layer for layer, h in heads.items() if h)
    return {
        "count": sum(len(h) for h in heads.values()),
        "layers": len(layers),
        "lowest_layer": layers[0] if layers else None,
        "highest_layer": layers[-1] if layers else None,
    }


def select_truthfulqa_heads(
    model: nn.Module,
    tokenizer: Any,
    k: int,
    records: int,
    out_path: Path,
    precision: str,
    data_root: Path | None,
) -> HeadMap:
    """Run `select_heads` (LoFiT, DPO) on the first `records` TruthfulQA fold-0 training pairs, 1 epoch."""
    import lofit
    from lofit.tasks import load_task

    task = load_task("truthfulqa", data_dir=data_root, fold=0)
    selection = lofit.select_heads(
        model,
        tokenizer,
        task.train[:records],
        method="lofit",
        objective="dpo",
        epochs=1,
        lr=float(task.defaults.get("lr_select", 5e-3)),
        l1=float(task.defaults.get("l1", 5e-4)),
        precision=precision,
        progress=False,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    selection.save(out_path)
    return selection.top(k)
