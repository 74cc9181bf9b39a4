"""The architecture tables: where each `model_type` keeps the modules lofit and its baselines edit.

One home for every per-architecture fact lofit relies on, so that supporting a new architecture means
adding rows here (and nothing elsewhere):

- `OUTPUT_PROJECTION_SUFFIXES`: the attention output projection, whose input is the concatenation of
  all heads' outputs (LoFiT's site, RED's "attention" site).
- `MLP_OUTPUT_SUFFIXES`: the module whose output is the FFN output (RED's "mlp" site).
- `LORA_TARGET_MODULES`: the query and value projections the LoRA baseline adapts.
- `BIAS_SWITCHES`: the config field that gives the attention (or FFN) output projection a bias, which a
  merged offset needs in a plain checkpoint.

Example:
    >>> OUTPUT_PROJECTION_SUFFIXES["gpt2"], MLP_OUTPUT_SUFFIXES["opt"], BIAS_SWITCHES["opt"]["attention"]
    ('attn.c_proj', 'fc2', 'enable_bias')
"""

from __future__ import annotations

_LLAMA_LIKE = (
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "olmo",
    "olmo2",
    "granite",
    "cohere",
    "stablelm",
    "starcoder2",
    "smollm3",
)

# model_type -> suffix of the attention output projection's qualified name.
OUTPUT_PROJECTION_SUFFIXES: dict[str, str] = {
    **dict.fromkeys(_LLAMA_LIKE, "self_attn.o_proj"),
    "phi": "self_attn.dense",
    "gpt2": "attn.c_proj",
    "gpt_bigcode": "attn.c_proj",
    "gpt_neox": "attention.dense",
    "gptj": "attn.out_proj",
    "opt": "self_attn.out_proj",
    "falcon": "self_attention.dense",
    "bloom": "self_attention.dense",
}

# model_type -> suffix of the module whose output is the FFN output (RED's own placement).
MLP_OUTPUT_SUFFIXES: dict[str, str] = {
    **dict.fromkeys(
        [t for t in _LLAMA_LIKE if t not in ("mixtral", "qwen2_moe", "qwen3_moe", "starcoder2")],
        "mlp.down_proj",
    ),
    "phi": "mlp.fc2",
    "gpt2": "mlp.c_proj",
    "gpt_bigcode": "mlp.c_proj",
    "gpt_neox": "mlp.dense_4h_to_h",
    "gptj": "mlp.fc_out",
    "opt": "fc2",
    "falcon": "mlp.dense_4h_to_h",
    "bloom": "mlp.dense_4h_to_h",
    "starcoder2": "mlp.c_proj",
}

# model_type -> module-name suffixes holding the query and value projections (LoRA's targets).
# Fused query/key/value projections (GPT-2 `c_attn`, GPT-NeoX `query_key_value`, Phi-3 `qkv_proj`)
# cannot adapt q and v alone; LoRA then adapts the fused projection, as peft does by default.
LORA_TARGET_MODULES: dict[str, list[str]] = {
    **{t: ["q_proj", "v_proj"] for t in (*[t for t in _LLAMA_LIKE if t != "phi3"], "phi", "gptj", "opt")},
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
}

# model_type -> {site: config field that switches a bias on for that site's projections}. A merged
# offset (LoFiT) or RED bias becomes a bias of the edited projection; a plain checkpoint holds it only if
# the config says the projection has one. Absent: the class has no such switch (see `LLAMA_EQUIVALENT`).
_ATTENTION_ONLY = {"attention": "attention_bias"}
_LLAMA_SWITCHES = {"attention": "attention_bias", "mlp": "mlp_bias"}
BIAS_SWITCHES: dict[str, dict[str, str]] = {
    **dict.fromkeys(("llama", "granite", "smollm3"), _LLAMA_SWITCHES),
    **dict.fromkeys(
        ("qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "gpt_neox"), _ATTENTION_ONLY
    ),
    "opt": {"attention": "enable_bias", "mlp": "enable_bias"},
}

# Architectures whose output projection cannot hold a bias, but whose models (for configs that pass
# `lofit.adapters.merged`'s checks) are exactly a `LlamaForCausalLM` with `attention_bias=True`.
LLAMA_EQUIVALENT = ("mistral", "qwen2", "phi3")
