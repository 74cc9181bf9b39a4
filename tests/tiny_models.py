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
ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "opt"]


def tiny_config(model_type: str) -> PretrainedConfig:
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4
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
    if model_type == "phi3":
        return Phi3Config(**common, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    if model_type == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128)
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
        )
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
