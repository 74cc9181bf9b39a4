"""Tiny random models of each supported architecture, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 128
# Special-token ids of `tiny_tokenizer()`, written into every config so generate() stops and pads inside the vocab.
UNK_ID, PAD_ID, EOS_ID = 0, 1, 2
ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "opt"]


def tiny_config(model_type: str) -> PretrainedConfig:
    tokens = dict(bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        **tokens,
    )
    if model_type == "llama":
        return LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=128)
    if model_type == "mistral":
        return MistralConfig(
            **common, num_key_value_heads=2, max_position_embeddings=128, sliding_window=None
        )
    if model_type == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=2, max_position_embeddings=128)
    if model_type == "qwen3":  # head_dim != hidden / heads
        return Qwen3Config(**common, num_key_value_heads=2, head_dim=12, max_position_embeddings=128)
    if model_type == "gemma":
        return GemmaConfig(**common, num_key_value_heads=1, head_dim=16, max_position_embeddings=128)
    if model_type == "gemma2":
        return Gemma2Config(
            **common, num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=64
        )
    if (
        model_type == "gemma3_text"
    ):  # Gemma 3's text model: sliding/global layers, q/k norms, scaled embeddings
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            **common,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=128,
            sliding_window=64,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )
    if model_type == "phi3":
        return Phi3Config(**common, num_key_value_heads=2, max_position_embeddings=128)
    if model_type == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128, **tokens)
    if model_type == "gpt_neox":
        return GPTNeoXConfig(**common, max_position_embeddings=128)
    if model_type == "opt":
        return OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            **tokens,
        )
    raise ValueError(model_type)


def tiny_vllm_config(model_type: str) -> PretrainedConfig:
    """A tiny llama / qwen2 that vLLM's CPU attention serves (head sizes 32, 64, ...: here 128 / 4 = 32)."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        initializer_range=0.2,  # varied greedy tokens
        tie_word_embeddings=False,
    )
    if model_type == "llama":
        return LlamaConfig(**common)
    if model_type == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(model_type)


def tiny_model(model_type: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation="eager")
    model.eval()
    return model


def tiny_tokenizer():  # type: ignore[no-untyped-def]
    """A character-level fast tokenizer over printable ASCII (vocabulary < VOCAB), with eos/pad/unk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "</s>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: index for index, token in enumerate(specials + chars)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", padding_side="right"
    )


# ---------------------------------------------------------------------------------------- oracle
# Written from the architectures' source, independently of lofit.adapters.heads: the attention output projection
# of each tiny model and the width of one head's slice of its input.
OUTPUT_PROJECTION = {
    "llama": "self_attn.o_proj",
    "mistral": "self_attn.o_proj",
    "qwen2": "self_attn.o_proj",
    "qwen3": "self_attn.o_proj",
    "gemma": "self_attn.o_proj",
    "gemma2": "self_attn.o_proj",
    "gemma3_text": "self_attn.o_proj",
    "phi3": "self_attn.o_proj",
    "gpt2": "attn.c_proj",
    "gpt_neox": "attention.dense",
    "opt": "self_attn.out_proj",
}
HEAD_DIM = {"qwen3": 12, "gemma": 16, "gemma2": 16, "gemma3_text": 16}  # others: hidden 32 / 4 heads = 8


def head_dim_of(model_type: str) -> int:
    return HEAD_DIM.get(model_type, 8)


def oracle_logits(
    model_type: str,
    seed: int,
    head_params: dict[tuple[int, int], dict[str, torch.Tensor]],
    input_ids: torch.Tensor,
    suffix: str | None = None,
) -> torch.Tensor:
    """Logits of a fresh, unwrapped base model whose projection inputs are edited head by head by hand."""
    base = tiny_model(model_type, seed)
    suffix = suffix or OUTPUT_PROJECTION[model_type]
    projections = [m for name, m in base.named_modules() if name.endswith(suffix)]
    assert len(projections) == base.config.num_hidden_layers
    d = head_dim_of(model_type)

    def edit(layer: int):  # type: ignore[no-untyped-def]
        def hook(module, args):  # type: ignore[no-untyped-def]
            z = args[0].clone()
            for (lay, head), entry in head_params.items():
                if lay == layer:
                    cols = slice(head * d, (head + 1) * d)
                    z[..., cols] = (1 + entry["scale"]) * z[..., cols] + entry["offset"]
            return (z, *args[1:])

        return hook

    for layer, projection in enumerate(projections):
        projection.register_forward_pre_hook(edit(layer))
    with torch.no_grad():
        return base(input_ids=input_ids).logits
