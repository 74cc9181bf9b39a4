"""What the vLLM tests share: tiny models with saved adapters, and lofit's own generate as the oracle."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lofit import LofitConfig, LofitModel, get_lofit_model
from tiny_models import tiny_tokenizer, tiny_vllm_config

TOLERANCE = 1e-4
NEW_TOKENS = 10
ADAPTERS = {  # name -> (heads, use_scale)
    "first": ({0: [1]}, False),
    "middle": ({1: [0, 3], 2: [2]}, False),
    "scaled": ({2: [1], 1: [0]}, True),
    "wide": ({0: [0, 1, 2, 3], 1: [2]}, False),
}


def save_model_and_adapters(model_type: str, folder: Path) -> tuple[Path, dict[str, Path]]:
    torch.manual_seed(0)
    base_dir = folder / "base"
    AutoModelForCausalLM.from_config(tiny_vllm_config(model_type)).save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    adapters = {}
    for seed, (name, (heads, scale)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + seed)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        config = LofitConfig(heads=heads, use_scale=scale, init_std=1.0)
        get_lofit_model(base, config).save_pretrained(folder / name)
        adapters[name] = folder / name
    return base_dir, adapters


class Oracle:
    """lofit's own generate on the same weights, one request at a time (memoised)."""

    def __init__(self, model: LofitModel) -> None:
        self.model = model.eval()
        self.model.get_base_model().generation_config.eos_token_id = None  # vLLM runs with ignore_eos
        self._memo: dict[tuple[tuple[int, ...], str | None], tuple[list[int], list[float]]] = {}

    @classmethod
    def from_folders(cls, base_dir: Path, adapters: dict[str, Path]) -> Oracle:
        """The base in fp32 with every adapter loaded under its name."""
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        names = list(adapters)
        model = LofitModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
        return cls(model)

    def __call__(self, prompt: list[int], adapter: str | None) -> tuple[list[int], list[float]]:
        key = (tuple(prompt), adapter)
        if key not in self._memo:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    adapter_names=[adapter or "__base__"],
                    output_scores=True,
                    return_dict_in_generate=True,
                    pad_token_id=1,
                )
            tokens = out.sequences[0, len(prompt) :].tolist()
            logprobs = [
                torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens, strict=True)
            ]
            self._memo[key] = (tokens, logprobs)
        return self._memo[key]
