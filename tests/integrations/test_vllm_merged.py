"""A merged export (`lofit merge`) served by plain vLLM gives transformers' tokens and log-probabilities.

One adapter folded into the weights needs no plugin: any engine that loads the architecture serves it
(Qwen2 comes back as the equivalent `LlamaForCausalLM` with an output-projection bias). Skipped (with
the reason) where vLLM cannot be imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not importable here; `make vllm-test` builds .venv-vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from lofit import LofitConfig, get_lofit_model  # noqa: E402
from lofit.integrations.export import export_merged  # noqa: E402
from tiny_models import tiny_vllm_config  # noqa: E402

NEW_TOKENS = 10


def transformers_greedy(model: Any, prompt: list[int]) -> tuple[list[int], list[float]]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=1,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    return tokens, [
        torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens, strict=True)
    ]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_merged_export_in_vllm_matches_transformers(model_type: str, tmp_path: Path) -> None:
    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_config(tiny_vllm_config(model_type))
    adapted = get_lofit_model(base, LofitConfig(heads={0: [1, 2], 2: [3]}, init_std=1.0))
    merged_dir = export_merged(adapted.merge_and_unload(), tmp_path / "merged")
    reference = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    assert reference.config.architectures == ["LlamaForCausalLM"]
    llm = vllm.LLM(
        str(merged_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=128,
        seed=0,
        kv_cache_memory_bytes=32 * 2**20,
        skip_tokenizer_init=True,
    )
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42], [3, 90, 17, 64, 22, 101, 7]]
    params = vllm.SamplingParams(
        max_tokens=NEW_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True, detokenize=False
    )
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    llm.llm_engine.engine_core.shutdown()
    for prompt, output in zip(prompts, outputs, strict=True):
        want_tokens, want_logprobs = transformers_greedy(reference, prompt)
        tokens = list(output.outputs[0].token_ids)
        assert tokens == want_tokens
        logprobs = [output.outputs[0].logprobs[i][t].logprob for i, t in enumerate(tokens)]
        assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True)) <= 1e-4
    # The adapter matters: the base alone (rebuilt: merging changed `base` in place) generates otherwise.
    torch.manual_seed(7)
    plain = AutoModelForCausalLM.from_config(tiny_vllm_config(model_type)).eval()
    plain.generation_config.eos_token_id = None
    assert any(transformers_greedy(plain, p)[0] != transformers_greedy(reference, p)[0] for p in prompts)
