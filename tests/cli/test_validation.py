"""`lofit eval` / `lofit train` on the inputs that used to end in an internal error (exit 1), a garbage
metric (exit 0) or an unbounded run: each now ends in one message naming what to change (exit 2), or, for
an over-long input, in a result with a warning that says how much was cut (exit 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lofit import LofitConfig, get_lofit_model
from lofit.adapters.persistence import unpack_vectors
from lofit.cli.main import main
from tiny_models import tiny_model, tiny_tokenizer

MC = {"question": "2+2=", "choices": ["4", "5"], "answer": 0}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("validation_assets")
    tokenizer = tiny_tokenizer()
    nan_model = tiny_model("llama")
    with torch.no_grad():
        nan_model.model.embed_tokens.weight.fill_(float("nan"))
    paths = {}
    for name, model in {"llama": tiny_model("llama"), "nan_llama": nan_model}.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    get_lofit_model(tiny_model("llama"), LofitConfig(heads={0: [0, 2]}, init_std=0.1)).save_pretrained(
        root / "adapter"
    )
    paths["adapter"] = root / "adapter"
    paths["test"] = root / "test.jsonl"
    paths["test"].write_text(json.dumps(MC) + "\n")
    return paths


@dataclass
class Run:
    root: Path
    assets: dict[str, Path]

    def jsonl(self, *records: object) -> Path:
        path = self.root / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))  # ASCII: "\ud800" stays an escape
        return path

    def eval(self, test: Path | None = None, adapter: Path | None = None, model: str = "llama") -> list[str]:
        args = ["eval", "--model", str(self.assets[model]), "--task", "mc", "--no-progress",
                "--test", str(test or self.assets["test"])]  # fmt: skip
        return [*args, "--adapter", str(adapter)] if adapter else args

    def adapter(self, edit: Callable[[Path], None]) -> Path:
        target = self.root / "adapter"
        shutil.copytree(self.assets["adapter"], target)
        edit(target)
        return target

    def train(self, *records: object, task: str = "sft", extra: tuple[str, ...] = ()) -> list[str]:
        return ["select", "--model", str(self.assets["llama"]), "--task", task, "--train", str(self.jsonl(*records)),
                "--out", str(self.root / "out"), "--epochs", "1", "--no-progress", *extra]  # fmt: skip


def _offsets(value: torch.Tensor) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        weights = path / "lofit_model.safetensors"
        tensors = unpack_vectors(load_file(str(weights)), weights)  # one tensor per layer (format 1 layout)
        tensors["layers.0.offset"] = value
        save_file(tensors, str(path / "lofit_model.safetensors"))

    return edit


def _config(replace: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        (path / "lofit_config.json").unlink()
        replace(path / "lofit_config.json")

    return edit


# (name, command builder, exit code, phrases of stderr)
CASES: list[tuple[str, Callable[[Run], list[str]], int, tuple[str, ...]]] = [
    ("a lone surrogate in a question", lambda r: r.eval(r.jsonl({**MC, "question": "a\ud800"})), 2,
     ("line 1", "'question'", "lone UTF-16 surrogate")),
    ("a NUL byte in a choice", lambda r: r.eval(r.jsonl({**MC, "choices": ["4", "\u0000"]})), 2, ("NUL byte",)),
    ("duplicate choices", lambda r: r.eval(r.jsonl({**MC, "choices": ["4", "4"]})), 2, ("the same text",)),
    ("float64 1e300 offsets", lambda r: r.eval(adapter=r.adapter(_offsets(torch.full((2, 8), 1e300, dtype=torch.float64)))),
     2, ("lofit_model.safetensors", "too large for torch.float32")),
    ("int32 offsets", lambda r: r.eval(adapter=r.adapter(_offsets(torch.ones(2, 8, dtype=torch.int32)))), 2,
     ("torch.int32",)),
    ("config a directory", lambda r: r.eval(adapter=r.adapter(_config(Path.mkdir))), 2,
     ("lofit_config.json", "directory")),
    ("config a FIFO", lambda r: r.eval(adapter=r.adapter(_config(os.mkfifo))), 2, ("FIFO",)),
    ("config a link to /dev/zero", lambda r: r.eval(adapter=r.adapter(_config(lambda p: p.symlink_to("/dev/zero")))),
     2, ("device",)),
    ("a model with NaN logits", lambda r: r.eval(model="nan_llama"), 2, ("NaN/inf logits", "no metric")),
    ("an adapter with NaN logits", lambda r: r.eval(model="nan_llama", adapter=r.assets["adapter"]), 2,
     ("base model", "differ")),  # refused earlier: it was not trained on this model
    ("every completion cut", lambda r: r.train(*[{"prompt": "abc", "completion": "d" * 30}] * 3,
     extra=("--max-length", "8")), 2, ("every one of the 3 sequences",)),
    ("a DPO pair of one response", lambda r: r.train({"prompt": "p", "chosen": "a", "rejected": "a"}, task="dpo"), 2,
     ("same text as 'chosen'",)),
    ("a 200,000-character question", lambda r: r.eval(r.jsonl({**MC, "question": "ab " * 66_667})), 0,
     ("1 input(s) longer than 128 tokens", "were cut from the left")),
]  # fmt: skip


@pytest.mark.parametrize(("build", "code", "phrases"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_input(
    build: Callable[[Run], list[str]],
    code: int,
    phrases: tuple[str, ...],
    assets: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = build(Run(tmp_path, assets))
    start = time.perf_counter()
    with pytest.warns() if code == 0 else contextlib.nullcontext():
        assert main(argv) == code
    err = capsys.readouterr().err
    assert time.perf_counter() - start < 120
    assert "internal error" not in err and "Traceback" not in err
    if code == 2:
        for phrase in phrases:
            assert phrase in err, err


def test_the_cut_warning_reaches_the_user(assets: dict[str, Path], tmp_path: Path) -> None:
    run = Run(tmp_path, assets)
    with pytest.warns(
        UserWarning, match=r"longer than 128 tokens .* by up to [\d,]+ characters before tokenising"
    ):
        assert main(run.eval(run.jsonl({**MC, "question": "ab " * 66_667}))) == 0
