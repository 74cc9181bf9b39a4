"""The README runs as pasted: every python and shell block is run (the ones on the real model under `slow`).

Fast checks: every `lofit ...` line parses with the real command line (an option renamed without the README
following fails here), every `make` target exists (`make -n`), and the Trainer block runs as written on a tiny
model (`lofit.load_model` handed a tiny model instead of the bundled one). Slow: each python block runs as it
is in a fresh process, each shell block in `bash -e` (with the bundled SmolLM2), except `make run` / `make test`
themselves, which set up a virtual environment and run the whole suite: they are checked with `make -n`.
The vLLM section's blocks need vLLM (`.venv-vllm`, `make vllm-test`) and are run by the serving tests; here
their `lofit serve` lines are parsed.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.DOTALL)
VLLM_SECTION = "## Serving many adapters with vLLM"  # needs vLLM (.venv-vllm): tests/integrations/test_vllm_*


def blocks(language: str, vllm: bool = False) -> list[str]:
    """The README's blocks of `language`: outside the vLLM section, or (vllm=True) inside it."""
    text = README.read_text(encoding="utf-8")
    head, _, rest = text.partition(VLLM_SECTION)
    serving, _, tail = rest.partition("\n## ")
    source = serving if vllm else head + "\n## " + tail
    return [code for lang, code in BLOCK.findall(source) if lang == language]


def shell_lines() -> list[str]:
    """Every `lofit ...` and `make ...` command line of the README (the vLLM section's too)."""
    lines = []
    for block in blocks("bash") + blocks("bash", vllm=True):
        for line in block.splitlines():
            command = line.split(" #", 1)[0].strip().removesuffix("&").strip()
            if command.startswith(("lofit ", "make ")):
                lines.append(command)
    return lines


def test_the_readme_has_the_blocks_this_file_runs() -> None:
    assert len(blocks("python")) == 2 and len(blocks("bash")) == 2
    assert len(blocks("python", vllm=True)) + len(blocks("bash", vllm=True)) >= 1
    assert BLOCK.sub("", README.read_text(encoding="utf-8")).count("```") == 0  # no block of another language


@pytest.mark.parametrize("line", shell_lines())
def test_every_shell_line_is_a_valid_command(line: str) -> None:
    words = shlex.split(line)
    if words[0] == "make":
        result = subprocess.run(
            ["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
        return
    from lofit.cli.main import build_parser

    assert words[0] == "lofit"
    args, unknown = build_parser().parse_known_args(words[1:])  # argparse exits 2 on a misspelt value
    assert not unknown or args.command == "serve", unknown  # only `serve` passes options on (to vLLM)


def test_the_trainer_block_runs_as_written_on_a_tiny_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lofit
    from tiny_models import tiny_model, tiny_tokenizer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lofit, "load_model", lambda name, **kwargs: (tiny_model("llama"), tiny_tokenizer()))
    code = next(block for block in blocks("python") if "Trainer(" in block)
    code = code.replace(
        "{3: [0, 2], 7: [1]}", "{1: [0, 2], 2: [1]}"
    )  # the tiny model has 3 layers of 4 heads
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "out" / "final" / "model.safetensors").stat().st_size < 16_000
    ids = torch.tensor([[5, 9, 17, 33]])
    with torch.no_grad():  # the adapter reloaded from Trainer's save_model() gives the merged model's logits
        gap = (
            (namespace["again"](input_ids=ids).logits - namespace["merged"](input_ids=ids).logits).abs().max()
        )
    assert gap.item() <= 1e-5
    # the merged checkpoint reloads in a process that never imports lofit, with the adapted logits
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained('out/merged', dtype=torch.float32)\n"
        "assert 'lofit' not in sys.modules\n"
        f"torch.save(m(input_ids=torch.tensor({ids.tolist()})).logits.detach(), 'l.pt')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    with torch.no_grad():
        adapted = namespace["merged"](input_ids=ids).logits
    assert (torch.load(tmp_path / "l.pt") - adapted).abs().max().item() <= 1e-5


def environment() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # the `lofit` console script of this environment
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


@pytest.mark.slow
@pytest.mark.parametrize("index", range(2))
def test_python_block_runs_as_pasted(index: int, tmp_path: Path) -> None:
    code = blocks("python")[index]
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=environment(), check=True, timeout=3600)


@pytest.mark.slow
def test_the_command_line_block_runs_as_pasted(tmp_path: Path) -> None:
    [block] = [b for b in blocks("bash") if b.lstrip().startswith("lofit")]
    subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=environment(), check=True, timeout=3600)
    assert (tmp_path / "runs" / "tqa" / "report.md").is_file()
    assert (tmp_path / "runs" / "off" / "samples.jsonl").read_text().count("\n") == 20
    assert (tmp_path / "runs" / "merged" / "config.json").is_file() and (
        tmp_path / "runs" / "merged.gguf"
    ).is_file()
