"""The one tokeniser ("BOS, no EOS") and common prefixes, against tokenizers that add BOS, append EOS or both."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lofit.training.tokens import common_prefix_length, encode, encode_batch
from tiny_models import tiny_tokenizer

TEMPLATES = {"plain": None, "bos": "<s> $A", "eos": "$A </s>", "both": "<s> $A </s>"}


def tokenizer_with(template: str | None) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "</s>", "<s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    if template is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )


@pytest.mark.parametrize("kind", list(TEMPLATES))
@pytest.mark.parametrize("text", ["abc", "", "a</s>"])
def test_encode_keeps_bos_and_drops_only_what_the_tokenizer_appends(kind: str, text: str) -> None:
    tokenizer = tokenizer_with(TEMPLATES[kind])
    own = [ord(c) - 32 + 4 for c in text] if "<" not in text else [ord("a") - 32 + 4, 1]  # the text's ids
    bos = [2] if kind in ("bos", "both") else []
    assert encode(tokenizer, text) == bos + own  # oracle: written from the templates, not from lofit
    assert encode_batch(tokenizer, [text, "xy"]) == [encode(tokenizer, text), encode(tokenizer, "xy")]


def test_encode_on_the_tiny_tokenizer_is_its_plain_ids() -> None:
    tokenizer = tiny_tokenizer()
    assert encode(tokenizer, "hi there") == tokenizer("hi there", add_special_tokens=False)["input_ids"]


def test_common_prefix_length() -> None:
    assert common_prefix_length([[1, 2, 3], [1, 2, 4, 5]]) == 2
    assert common_prefix_length([[1, 2], [1, 2, 3], [1, 2]]) == 2
    assert common_prefix_length([[1], [2]]) == 0
    assert common_prefix_length([]) == 0
    assert common_prefix_length([[7, 8, 9]]) == 3
