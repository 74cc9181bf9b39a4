"""The README's "With Trainer, TRL, PEFT and the Hub" example runs as written (tiny model, offline)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## With Trainer, TRL, PEFT and the Hub"


def section_code() -> str:
    text = README.read_text(encoding="utf-8")
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, re.DOTALL)
    assert blocks, "the README section has no python example"
    return "\n".join(blocks)


def test_readme_integration_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datasets import Dataset

    import lofit
    from tiny_models import tiny_model, tiny_tokenizer

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    base = tiny_model("llama")
    encoded = tiny_tokenizer()(["the cat sat on the mat", "a dog ran in the parks"] * 2)  # equal lengths
    data = Dataset.from_dict({**encoded, "labels": encoded["input_ids"]})
    namespace = {"lofit": lofit, "base": base, "data": data}
    exec(compile(section_code(), str(README), "exec"), namespace)

    assert sorted(p.name for p in (tmp_path / "out" / "adapter").iterdir()) == [
        "adapter_config.json",
        "lofit_config.json",
        "lofit_model.safetensors",
    ]
    ids = torch.tensor([[5, 9, 17, 33]])
    with torch.no_grad():
        adapted = namespace["merged"](input_ids=ids).logits
        loaded = lofit.LofitModel.from_pretrained(tiny_model("llama"), tmp_path / "out" / "adapter")
        assert (loaded(input_ids=ids).logits - adapted).abs().max().item() <= 1e-5
    # The merged checkpoint reloads in a process that never imports lofit, with the adapted logits.
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out' / 'merged')!r}, dtype=torch.float32)\n"
        "assert 'lofit' not in sys.modules\n"
        f"torch.save(m(input_ids=torch.tensor({ids.tolist()})).logits.detach(), {str(tmp_path / 'l.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    reloaded = torch.load(tmp_path / "l.pt")
    assert (reloaded - adapted).abs().max().item() <= 1e-5
