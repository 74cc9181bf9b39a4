"""Attacks on what lofit writes: links in and at outputs, outputs that are inputs, folders holding files lofit
did not write, user files that look like temporaries, full disks; through the CLI and the Python API.

Each case records a verdict: "clear" (refused with exit 2 / a `LofitError` or `OSError` naming the fix),
"ok" (done, and everything that was there is kept), "internal" (exit 1, a bug), "silent" (done although it
should have been refused), "data loss" (an input, a file outside the output or a user's file changed or
vanished) or "hang" (no end within the time limit). Every case must end in its expected verdict. With
`LOFIT_WRITE_ATTACKS_REPORT=FILE` each case appends its row (JSON) to FILE: the counts of the report.

`test_links_to_every_input_and_outside_file_never_change_them` is the property-style test: every subcommand
and the Python save paths, with an output seeded (randomly, fixed seeds) with links to every input and to
files and folders outside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lofit.cli.main import main
from tiny_models import tiny_model, tiny_tokenizer

RECORDS = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(3) for b in range(3)]
FAST = ["--epochs", "1", "--batch-size", "4", "--no-progress"]
LINK = "is a symbolic link"
INPUT = "lofit never writes where it reads"
FOREIGN = "lofit did not write"
REPORT = os.environ.get("LOFIT_WRITE_ATTACKS_REPORT")
TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture
def assets(built: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fresh copy of the assets for each case, so that a case losing data cannot spoil the next ones."""
    root = tmp_path_factory.mktemp("assets")
    shutil.copytree(built["root"], root, dirs_exist_ok=True, symlinks=True)
    return {name: root / path.relative_to(built["root"]) for name, path in built.items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama on disk, data files, a heads.json, an adapter, and files and folders outside any output."""
    from lofit.selection.select import select_heads
    from lofit.training.offsets import train_offsets

    root = tmp_path_factory.mktemp("write-assets")
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    em = [{"prompt": r["prompt"], "answers": [r["completion"]]} for r in RECORDS[:3]]
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in em))
    selection = select_heads(model, tokenizer, RECORDS, epochs=1, progress=False)
    selection.save(root / "sel" / "heads.json")
    adapter = train_offsets(model, tokenizer, RECORDS, selection.top(3), epochs=1, progress=False)
    adapter.save_pretrained(root / "adapter")
    outside = root / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_text("a file outside every output")
    (outside / "dir" / "notes.txt").write_text("a folder outside every output")
    (outside / "model.safetensors").write_bytes(b"another model's weights")
    return {
        "root": root, "llama": root / "llama", "train": data / "train.jsonl", "test": data / "test.jsonl",
        "data": data, "heads": root / "sel" / "heads.json", "adapter": root / "adapter",
        "outside": outside, "secret": outside / "secret.txt", "outdir": outside / "dir",
        "weights": root / "llama" / "model.safetensors", "config": root / "llama" / "config.json",
    }  # fmt: skip


def snapshot(*roots: Path) -> dict[str, Any]:
    """Every entry under `roots`: a file's sha256, a link's destination, a folder's presence."""
    found: dict[str, Any] = {}
    for root in roots:
        if not os.path.lexists(root):
            continue
        for path in [root, *sorted(root.rglob("*"))]:
            if path.is_symlink():
                found[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir():
                found[str(path)] = "dir"
    return found


@dataclass
class Env:
    """One case's folder (the output lives in it), the shared assets and what the case must keep."""

    root: Path
    assets: dict[str, Path]
    keep: list[Path] = field(default_factory=list)  # extra paths (a user's files) that must stay unchanged

    @property
    def out(self) -> Path:
        return self.root / "out"

    def link(self, name: str, target: Path | str) -> Path:
        path = self.out / name if not Path(name).is_absolute() else Path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
        return path

    def file(self, name: str, text: str = "mine") -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.keep.append(path)
        return path

    def copy(self, asset: str, name: str) -> Path:
        target = self.root / name
        shutil.copytree(self.assets[asset], target)
        self.keep.append(target)
        return target

    # -- command lines
    def common(self) -> list[str]:
        return ["--model", str(self.assets["llama"]), "--task", "sft", "--train", str(self.assets["train"])]

    def select(self, *extra: str, out: Path | None = None) -> list[str]:
        return ["select", *self.common(), "--out", str(out or self.out), *FAST, *extra]

    def train(self, *extra: str, out: Path | None = None) -> list[str]:
        return ["train", *self.common(), "--heads", str(self.assets["heads"]), "--k", "3",
                "--out", str(out or self.out), *FAST, *extra]  # fmt: skip

    def run(self, *extra: str, out: Path | None = None) -> list[str]:
        return ["run", *self.common(), "--test", str(self.assets["test"]), "--k", "2",
                "--out", str(out or self.out), *FAST, *extra]  # fmt: skip

    def eval(self, out: Path, *extra: str) -> list[str]:
        return ["eval", "--model", str(self.assets["llama"]), "--task", "exact_match", "--no-progress",
                "--test", str(self.assets["test"]), "--adapter", str(self.assets["adapter"]),
                "--out", str(out), *extra]  # fmt: skip

    def merge(self, out: Path, *extra: str) -> list[str]:
        return ["merge", "--model", str(self.assets["llama"]), "--adapter", str(self.assets["adapter"]),
                "--out", str(out), *extra]  # fmt: skip


@dataclass
class Case:
    category: str
    name: str
    act: Callable[[Env], list[str] | Callable[[], object]]  # a command line, or a Python call
    expect: tuple[str, ...] | None  # message parts of the refusal; None: the operation succeeds
    check: Callable[[Env], None] | None = None  # more assertions after it
    subprocess: bool = False  # run the command line through `python -m lofit` in a fresh process


# ---------------------------------------------------------------------------------------- links
def link_cases() -> list[Case]:
    run_links = [  # (artefact in --out, what it links to)
        ("adapter", "llama"), ("adapter", "outdir"), ("heads.json", "train"), ("heads.json", "secret"),
        ("metrics.json", "test"), ("metrics.json", "secret"), ("report.md", "secret"), ("heads.png", "weights"),
        ("train", "outdir"), ("select", "llama"), ("train/checkpoints", "outdir"),
    ]  # fmt: skip
    select_links = [
        ("heads.json", "train"), ("heads.json", "secret"), ("heads.png", "weights"), ("select", "outdir"),
        ("select/checkpoints", "outdir"), ("select/train_log.jsonl", "train"),
    ]  # fmt: skip
    train_links = [
        ("adapter", "llama"), ("adapter", "adapter"), ("adapter", "outdir"), ("train", "llama"),
        ("train/train_log.jsonl", "train"), ("train/loss_curve.png", "secret"), ("train/checkpoints", "outdir"),
    ]  # fmt: skip
    cases: list[Case] = []
    for command, links in (("run", run_links), ("select", select_links), ("train", train_links)):
        for name, target in links:

            def act(env: Env, name: str = name, target: str = target, command: str = command) -> list[str]:
                env.link(name, env.assets[target])
                return getattr(env, command)()

            cases.append(
                Case("links", f"{command}-{name.replace('/', '-')}-links-to-{target}", act, (LINK, name))
            )
    cases += [
        Case("links", "eval-out-links-to-test", lambda env: env.eval(env.link("m.json", env.assets["test"])),
             ("is the input --test", INPUT)),
        Case("links", "eval-out-links-to-outside", lambda env: env.eval(env.link("m.json", env.assets["secret"])),
             (LINK,), subprocess=True),
        Case("links", "eval-out-links-to-model-config", lambda env: env.eval(env.link("m.json", env.assets["config"])),
             ("lies inside the input --model", INPUT)),
        Case("links", "eval-out-dangling-link-outside",
             lambda env: env.eval(env.link("m.json", env.assets["outside"] / "new.json")), (LINK,)),
        Case("links", "eval-out-link-to-link-to-outside",
             lambda env: env.eval(env.link("m.json", env.link("hop", env.assets["secret"]))), (LINK,)),
        Case("links", "merge-out-links-to-outside-dir", lambda env: env.merge(env.link("m", env.assets["outdir"])),
             (LINK,), subprocess=True),
        Case("links", "merge-out-dangling-link", lambda env: env.merge(env.link("m", env.assets["outside"] / "new")),
             (LINK,)),
        Case("links", "merge-out-links-to-a-merged-copy",
             lambda env: env.merge(env.link("m", env.copy("llama", "copy"))), (LINK,)),
        # --out itself given through a link to a folder: written there, links inside it refused as above
        Case("links", "run-out-is-a-link-to-a-folder", lambda env: env.run(out=env.link(env.root / "o", _folder(env.root / "real"))),
             None, check=lambda env: _has(env.root / "real", "adapter", "metrics.json", "report.md")),
        Case("links", "select-out-is-a-link-to-a-folder",
             lambda env: env.select(out=env.link(env.root / "o", _folder(env.root / "real"))), None,
             check=lambda env: _has(env.root / "real", "heads.json")),
        Case("links", "lock-file-beside-out-links-to-train",
             lambda env: (env.link(env.root / ".out.lofit-lock", env.assets["train"]), env.select())[-1],
             (LINK, "lock file")),
        Case("links", "lock-file-beside-merge-out-links-to-weights",
             lambda env: (env.link(env.root / ".m.lofit-lock", env.assets["weights"]), env.merge(env.root / "m"))[-1],
             (LINK, "lock file")),
        # a link in --out that lofit does not write is left alone
        Case("links", "train-unrelated-links-kept",
             lambda env: (env.link("heads.json", env.assets["heads"]), env.link("data", env.assets["data"]), env.train())[-1],
             None, check=lambda env: _has(env.out, "adapter")),
    ]  # fmt: skip
    return cases


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _has(folder: Path, *names: str) -> None:
    for name in names:
        assert (folder / name).exists() and not (folder / name).is_symlink(), f"{folder / name} missing"


# ---------------------------------------------------------------------------------------- inputs
def input_cases() -> list[Case]:
    def export_into(env: Env, where: Callable[[Env], Path]) -> Callable[[], object]:
        from transformers import AutoModelForCausalLM

        from lofit import LofitModel
        from lofit.integrations.export import export_merged

        base = AutoModelForCausalLM.from_pretrained(env.assets["llama"])
        merged = LofitModel.from_pretrained(base, env.assets["adapter"]).merge_and_unload()
        return lambda: export_merged(merged, where(env), overwrite=True)

    def merge_api(env: Env, out: Path, **kwargs: Any) -> Callable[[], object]:
        from lofit.integrations.export import merge_adapter_checkpoint

        return lambda: merge_adapter_checkpoint(
            str(env.assets["llama"]), str(env.assets["adapter"]), str(out), **kwargs
        )

    return [
        Case("inputs", "eval-out-inside-linked-adapter",
             lambda env: env.eval(env.link(env.root / "ad", env.assets["adapter"]) / "m.json"), ("lies inside", INPUT)),
        Case("inputs", "eval-out-is-linked-test-folder-file",
             lambda env: env.eval(env.link(env.root / "d", env.assets["data"]) / "test.jsonl"), ("is the input --test",)),
        Case("inputs", "run-out-inside-linked-model",
             lambda env: env.run(out=env.link(env.root / "m", env.assets["llama"]) / "run"), ("lies inside", INPUT)),
        Case("inputs", "merge-out-inside-linked-model",
             lambda env: env.merge(env.link(env.root / "m", env.assets["llama"]) / "merged"), ("lies inside", INPUT)),
        Case("inputs", "merge-out-is-linked-adapter-parent",
             lambda env: env.merge(env.link(env.root / "r", env.assets["root"])), ("contains the input",)),
        Case("inputs", "select-out-is-data-dir-option",
             lambda env: env.select("--data-dir", str(env.assets["outside"]), out=env.assets["outdir"]),
             ("lies inside the input --data-dir",)),
        Case("inputs", "python-merge-out-is-base", lambda env: merge_api(env, env.assets["llama"]), ("is the input base",)),
        Case("inputs", "python-merge-out-is-adapter", lambda env: merge_api(env, env.assets["adapter"]),
             ("is the input adapter_dir",)),
        Case("inputs", "python-merge-out-inside-linked-base",
             lambda env: merge_api(env, env.link(env.root / "b", env.assets["llama"]) / "m"), ("lies inside",)),
        Case("inputs", "python-export-over-its-own-base-even-with-overwrite",
             lambda env: export_into(env, lambda e: e.assets["llama"]), ("the base model's folder", INPUT)),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------- ownership
def _same_model(folder: Path, reference: Path) -> None:
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), f"{name} changed"


def ownership_cases() -> list[Case]:
    def save_beside_model(env: Env, twice: bool = False, red: bool = False) -> Callable[[], object]:
        from transformers import AutoModelForCausalLM

        from lofit import LofitModel

        folder = env.copy("llama", "model")
        env.keep.remove(folder)  # gains the adapter files; its model files are checked below
        base = AutoModelForCausalLM.from_pretrained(folder)
        if red:
            from lofit.baselines.red import get_red_model

            adapted: Any = get_red_model(base)
        else:
            adapted = LofitModel.from_pretrained(base, env.assets["adapter"])

        def save() -> None:
            for _ in range(2 if twice else 1):
                adapted.save_pretrained(folder)

        return save

    def save_beside_peft(env: Env) -> Callable[[], object]:
        from transformers import AutoModelForCausalLM

        from lofit import LofitModel

        env.file("peft/adapter_config.json", '{"peft_type": "LORA"}')
        env.file("peft/adapter_model.safetensors", "a PEFT adapter's weights")
        base = AutoModelForCausalLM.from_pretrained(env.assets["llama"])
        lofit = LofitModel.from_pretrained(base, env.assets["adapter"])
        return lambda: lofit.save_pretrained(env.root / "peft")

    def check_beside(
        env: Env, names: tuple[str, ...] = ("lofit_config.json", "lofit_model.safetensors")
    ) -> None:
        from transformers import AutoModelForCausalLM

        folder = env.root / "model"
        _same_model(folder, env.assets["llama"])
        _has(folder, *names)
        AutoModelForCausalLM.from_pretrained(folder)  # the base still loads

    def foreign_model(env: Env, name: str = "other") -> Path:
        folder = env.copy("llama", name)
        (folder / "notes.txt").write_text("mine")
        return folder

    def merged_twice(env: Env) -> list[str]:
        assert main(env.merge(env.root / "m")) == 0
        (env.root / "m" / "notes.txt").write_text("mine")
        env.keep.append(env.root / "m" / "notes.txt")
        return env.merge(env.root / "m")

    def forged_manifest(env: Env) -> list[str]:
        folder = foreign_model(env)
        (folder / ".lofit-manifest.json").write_text('{"format": "other", "files": ["model.safetensors"]}')
        return env.merge(folder)

    def overwrite(env: Env) -> list[str]:
        folder = foreign_model(env)
        env.keep.remove(folder)
        env.keep.append(folder / "notes.txt")
        return env.merge(folder, "--overwrite")

    def linked_weights(env: Env, *extra: str) -> list[str]:
        folder = env.root / "x"
        folder.mkdir()
        (folder / "model.safetensors").symlink_to(env.assets["weights"])
        return env.merge(folder, *extra)

    def train_into_model_copy(env: Env) -> list[str]:
        folder = env.copy("llama", "out/adapter")
        env.keep.remove(folder)
        return env.train()

    def export_api(env: Env, overwrite: bool) -> Callable[[], object]:
        from transformers import AutoModelForCausalLM

        from lofit import LofitModel
        from lofit.integrations.export import export_merged

        folder = foreign_model(env)
        if overwrite:
            env.keep.remove(folder)
        merged = LofitModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(env.assets["llama"]), env.assets["adapter"]
        ).merge_and_unload()
        return lambda: export_merged(merged, folder, overwrite=overwrite)

    def notes_only(env: Env) -> list[str]:
        env.file("m/notes.txt")
        env.file("m/sub/more.txt")
        return env.merge(env.root / "m")

    return [
        Case("ownership", "save-pretrained-beside-its-base-keeps-the-model", save_beside_model, None, check=check_beside),
        Case("ownership", "save-pretrained-twice-beside-the-base", lambda env: save_beside_model(env, twice=True),
             None, check=check_beside),
        Case("ownership", "save-pretrained-beside-a-peft-adapter-keeps-its-config", save_beside_peft, None,
             check=lambda env: _has(env.root / "peft", "lofit_config.json", "adapter_model.safetensors")),
        Case("ownership", "red-save-pretrained-beside-the-base", lambda env: save_beside_model(env, red=True), None,
             check=lambda env: check_beside(env, ("red_config.json", "red_model.safetensors"))),
        Case("ownership", "train-adapter-folder-holds-a-model", train_into_model_copy, None,
             check=lambda env: (_same_model(env.out / "adapter", env.assets["llama"]),
                                _has(env.out / "adapter", "lofit_config.json"))),
        Case("ownership", "merge-over-another-model-refused", lambda env: env.merge(foreign_model(env)),
             (FOREIGN, "--overwrite", "model.safetensors"), subprocess=True),
        Case("ownership", "merge-over-another-model-with-overwrite", overwrite, None,
             check=lambda env: _has(env.root / "other", "model.safetensors", ".lofit-manifest.json", "notes.txt")),
        Case("ownership", "merge-over-its-own-merge", merged_twice, None),
        Case("ownership", "merge-into-a-folder-of-notes", notes_only, None,
             check=lambda env: _has(env.root / "m", "model.safetensors", "notes.txt", "sub/more.txt")),
        Case("ownership", "merge-forged-manifest-refused", forged_manifest, (FOREIGN,)),
        Case("ownership", "merge-over-lone-pytorch-bin-refused",
             lambda env: env.merge(env.file("m/pytorch_model.bin").parent), (FOREIGN, "pytorch_model.bin")),
        Case("ownership", "merge-over-a-link-to-the-base-weights-refused", linked_weights, (FOREIGN,)),
        Case("ownership", "merge-over-a-link-to-the-base-weights-overwrite",
             lambda env: linked_weights(env, "--overwrite"), None,
             check=lambda env: _has(env.root / "x", "model.safetensors")),
        Case("ownership", "python-export-over-another-model-refused", lambda env: export_api(env, False),
             (FOREIGN, "overwrite=True")),
        Case("ownership", "python-export-over-another-model-overwrite", lambda env: export_api(env, True), None,
             check=lambda env: _has(env.root / "other", ".lofit-manifest.json", "notes.txt")),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------- leftovers
USER_NAMES = [  # look like temporaries, are a user's
    ".notes.20240101.tmp", ".heads.json.abcd1234.tmp", ".adapter.x1y2z3w4.tmp", ".metrics.json.tmp",
    ".adapter.lofit-tmp-abcd1234", ".heads.json.lofit-old", "adapter.lofit-tmp-1-abcd1234",
]  # fmt: skip


def leftover_cases() -> list[Case]:
    def seeded(env: Env, names: list[str]) -> None:
        for name in names:
            env.file(f"out/{name}")
        env.file("out/train/checkpoints/.step-00000003.removing")
        env.file(".out.abcd1234.lofit-old")  # beside --out

    def dead_leftovers(env: Env) -> list[str]:
        (env.out / ".heads.json.lofit-tmp-999999-abcd1234").parent.mkdir(parents=True, exist_ok=True)
        (env.out / ".heads.json.lofit-tmp-999999-abcd1234").write_text("partial")
        (env.out / ".adapter.lofit-old-999999-abcd1234").mkdir()
        return env.select()

    def gone(env: Env) -> None:
        assert not [p for p in env.out.iterdir() if ".lofit-" in p.name], sorted(os.listdir(env.out))

    cases = []
    for name in USER_NAMES:
        cases.append(
            Case(
                "leftovers",
                f"select-keeps-{name}",
                lambda env, n=name: (seeded(env, [n]), env.select())[-1],
                None,
            )
        )
        cases.append(Case("leftovers", f"refused-select-keeps-{name}",
                          lambda env, n=name: (seeded(env, [n]), env.select("--lr", "nan"))[-1], ("--lr",)))  # fmt: skip
    cases += [
        Case("leftovers", "refused-train-keeps-all", lambda env: (seeded(env, USER_NAMES), env.train("--k", "999"))[-1],
             ("--k",)),
        Case("leftovers", "eval-keeps-all", lambda env: (seeded(env, USER_NAMES), env.eval(env.out / "m.json"))[-1],
             None),
        Case("leftovers", "merge-keeps-all-beside",
             lambda env: (env.file(".m.20240101.tmp"), env.file(".m.abcd1234.lofit-old"), env.merge(env.root / "m"))[-1],
             None),
        Case("leftovers", "dead-lofit-leftovers-removed", dead_leftovers, None, check=gone),
    ]  # fmt: skip
    return cases


# ------------------------------------------------------------------------------------ python api
def python_cases() -> list[Case]:
    def lofit_model(env: Env) -> Any:
        from transformers import AutoModelForCausalLM

        from lofit import LofitModel

        return LofitModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(env.assets["llama"]), env.assets["adapter"]
        )

    def save_to(env: Env, path: Path) -> Callable[[], object]:
        model = lofit_model(env)
        return lambda: model.save_pretrained(path)

    def selection_to(env: Env, path: Path) -> Callable[[], object]:
        from lofit.selection.ranking import HeadSelection

        selection = HeadSelection.load(env.assets["heads"])
        return lambda: selection.save(path)

    def train_log_linked(env: Env) -> Callable[[], object]:
        from lofit.training.offsets import train_offsets

        env.link("train_log.jsonl", env.assets["train"])
        model, tokenizer = tiny_model("llama"), tiny_tokenizer()
        return lambda: train_offsets(
            model, tokenizer, RECORDS, {0: [1]}, epochs=1, progress=False, output_dir=str(env.out)
        )

    def write_json(env: Env, target: Path) -> Callable[[], object]:
        from lofit.io.atomic import atomic_write_json

        return lambda: atomic_write_json(env.link("f.json", target), {})

    return [
        Case("python", "save-pretrained-into-link-to-the-base", lambda env: save_to(env, env.link("ad", env.assets["llama"])),
             (LINK,)),
        Case("python", "save-pretrained-into-link-to-outside", lambda env: save_to(env, env.link("ad", env.assets["outdir"])),
             (LINK,)),
        Case("python", "save-pretrained-into-a-file", lambda env: save_to(env, env.file("f.txt")), ("not a directory",)),
        Case("python", "selection-save-over-link-to-train", lambda env: selection_to(env, env.link("h.json", env.assets["train"])),
             (LINK,)),
        Case("python", "selection-save-over-link-to-outside",
             lambda env: selection_to(env, env.link("h.json", env.assets["secret"])), (LINK,)),
        Case("python", "train-offsets-log-is-a-link", train_log_linked, (LINK, "train_log.jsonl")),
        Case("python", "atomic-json-over-link-to-model-config", lambda env: write_json(env, env.assets["config"]), (LINK,)),
        Case("python", "atomic-json-over-dangling-link", lambda env: write_json(env, env.assets["outside"] / "n.json"),
             (LINK,)),
        Case("python", "merge-api-out-is-a-link", lambda env: _merge_api(env, env.link("m", env.assets["outdir"])), (LINK,)),
        Case("python", "merge-api-over-another-model", lambda env: _merge_api(env, env.copy("llama", "other")),
             (FOREIGN, "overwrite=True")),
    ]  # fmt: skip


def _merge_api(env: Env, out: Path) -> Callable[[], object]:
    from lofit.integrations.export import merge_adapter_checkpoint

    return lambda: merge_adapter_checkpoint(str(env.assets["llama"]), str(env.assets["adapter"]), str(out))


CASES = link_cases() + input_cases() + ownership_cases() + leftover_cases() + python_cases()


# ------------------------------------------------------------------------------------------ runner
def run_case(act: list[str] | Callable[[], object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit code, message) of a command line run in-process, or of a Python call (2: a user error, 1: a bug)."""
    from lofit.errors import LofitError

    capsys.readouterr()
    if isinstance(act, list):
        try:
            code = main(act)
        except SystemExit as stop:
            code = int(stop.code or 0)
        captured = capsys.readouterr()
        return code, captured.err + captured.out
    try:
        act()
    except (LofitError, OSError) as error:
        return 2, f"{type(error).__name__}: {error}"
    except Exception as error:  # a bug: the verdict says so
        return 1, f"internal {type(error).__name__}: {error}"
    return 0, ""


def verdict(code: int | None, output: str, expect: tuple[str, ...] | None, changed: list[str]) -> str:
    if code is None:
        return "hang"
    if changed:
        return "data loss"
    if code == 1 or "Traceback" in output or "internal error" in output:
        return "internal"
    if expect is None:
        return "ok" if code == 0 else f"refused (exit {code}): {output.strip().splitlines()[-1:]}"
    if code == 0:
        return "silent"
    missing = [part for part in expect if part not in output]
    return (
        "clear"
        if code == 2 and not missing
        else f"unclear (exit {code}, missing {missing}): {output.strip()}"
    )


def record(row: dict[str, Any]) -> None:
    if REPORT:
        with open(REPORT, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def changed_paths(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return sorted(path for path, value in before.items() if after.get(path) != value)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_write_attack(
    case: Case, assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = Env(tmp_path, assets)
    act = case.act(env)
    guarded = [assets["root"], *env.keep]
    before = snapshot(*guarded)
    code, output = run_case(act, capsys)
    changed = changed_paths(before, snapshot(*guarded))
    result = verdict(code, output, case.expect, changed)
    record({"category": case.category, "case": case.name, "verdict": result, "exit": code})
    expected = "ok" if case.expect is None else "clear"
    assert result == expected, f"{result}; changed: {changed}\n{output}"
    if case.check is not None:
        case.check(env)


SUBPROCESS_CASES = [c for c in CASES if c.subprocess]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[c.name for c in SUBPROCESS_CASES])
def test_write_attack_in_a_fresh_process(case: Case, assets: dict[str, Path], tmp_path: Path) -> None:
    env = Env(tmp_path, assets)
    argv = case.act(env)
    assert isinstance(argv, list)
    before = snapshot(assets["root"], *env.keep)
    result = subprocess.run(
        [sys.executable, "-m", "lofit", *argv], capture_output=True, text=True, timeout=300
    )
    changed = changed_paths(before, snapshot(assets["root"], *env.keep))
    assert verdict(result.returncode, result.stderr, case.expect, changed) == "clear", result.stderr


def test_there_are_at_least_80_write_attacks_in_every_category() -> None:
    counts: dict[str, int] = {}
    for case in CASES:
        counts[case.category] = counts.get(case.category, 0) + 1
    assert len(CASES) >= 80 and len({c.name for c in CASES}) == len(CASES)
    assert (
        set(counts) == {"links", "inputs", "ownership", "leftovers", "python"} and min(counts.values()) >= 10
    ), counts


def test_the_link_check_names_every_artefact_the_run_writes() -> None:
    from lofit.cli.steps import RUN_ARTEFACTS
    from lofit.training.loop import CURVE_NAME, LOG_NAME
    from lofit.training.settings import CHECKPOINT_SUBDIR

    for step in ("select", "train"):
        assert {f"{step}/{CHECKPOINT_SUBDIR}", f"{step}/{LOG_NAME}", f"{step}/{CURVE_NAME}"} <= set(
            RUN_ARTEFACTS
        )


# ---------------------------------------------------------------------------------- disk full
def _can_mount_tmpfs(tmp: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=8k none {tmp}"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


DISK_COMMANDS = ["run", "select", "train", "eval", "merge"]
DISK_SIZES = ["full", "12k", "48k"]  # full: a filler takes every block; else the tmpfs size (some writes fit)
# eval writes one small file, which a page of any tmpfs holds: only the full disk fails it
DISK_CASES = [(c, s) for c in DISK_COMMANDS for s in DISK_SIZES if c != "eval" or s == "full"]


@pytest.mark.parametrize(("command", "size"), DISK_CASES)
def test_a_full_disk_is_exit_2_in_every_command(
    command: str, size: str, assets: dict[str, Path], tmp_path: Path
) -> None:
    """A real full filesystem (a small tmpfs in a user namespace), not a simulated error: exit 2, one message."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if not _can_mount_tmpfs(mount):
        pytest.skip("cannot mount a tmpfs here (needs unshare and user namespaces)")
    env = Env(tmp_path, assets)
    out = mount / ("m.json" if command == "eval" else "out")
    argv = (
        env.eval(out)
        if command == "eval"
        else getattr(env, command)(out=out)
        if command != "merge"
        else env.merge(out)
    )
    fill = f"dd if=/dev/zero of={mount}/filler bs=4k 2>/dev/null; " if size == "full" else ""
    script = (
        f"mount -t tmpfs -o size={'64k' if size == 'full' else size} none {mount} && {fill}"
        f'exec "$0" -m lofit "$@"'
    )
    before = snapshot(assets["root"])
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, sys.executable, *argv],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    row = {"category": "disk-full", "case": f"{command}-{size}", "exit": result.returncode}
    last = result.stderr.strip().splitlines()[-1:] if result.stderr.strip() else []
    ok = result.returncode == 2 and "Traceback" not in result.stderr and "internal error" not in result.stderr
    row["verdict"] = (
        "clear" if ok else ("internal" if result.returncode == 1 else f"exit {result.returncode}")
    )
    record(row)
    assert snapshot(assets["root"]) == before
    assert ok, result.stderr[-3000:]
    assert any(text in last[0] for text in ("No space left", "cannot write")), last


# ------------------------------------------------------------------------- property: links everywhere
INPUT_ASSETS = ["llama", "weights", "config", "train", "test", "data", "heads", "adapter"]
OUTSIDE = ["secret", "outdir", "outside"]
WRITTEN = [
    "adapter", "heads.json", "heads.png", "metrics.json", "report.md", "select", "train", "train/checkpoints",
    "select/checkpoints", "train/train_log.jsonl", "train/loss_curve.png", "select/train_log.jsonl",
    "model.safetensors", "config.json", "tokenizer.json", "lofit_config.json", "lofit_model.safetensors",
]  # fmt: skip
OTHER = ["notes", "data-link", "weights-link", "nested/deeper"]
PROPERTY_TARGETS = ["run", "select", "train", "eval", "merge", "merge-overwrite", "save_pretrained",
                    "export_merged", "selection.save"]  # fmt: skip
SEEDS = [0, 1, 2]


def seed_links(env: Env, rng: random.Random, folder: Path, names: list[str]) -> None:
    """Links named `names` in `folder` (each with probability 1/2, at least one), to inputs and outside files."""
    chosen = [name for name in names if rng.random() < 0.5] or [rng.choice(names)]
    for name in chosen:
        path = folder / name
        if any(parent.is_symlink() for parent in path.parents) or os.path.lexists(path):
            continue  # "train/checkpoints" where "train" is already a link
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(env.assets[rng.choice(INPUT_ASSETS + OUTSIDE)])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("target", PROPERTY_TARGETS)
def test_links_to_every_input_and_outside_file_never_change_them(
    target: str, seed: int, assets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever links the output holds, every input, every outside file and every link stay as they were."""
    rng = random.Random(f"{target}-{seed}")
    env = Env(tmp_path, assets)
    env.out.mkdir()
    names = (
        WRITTEN + OTHER if seed != 2 else OTHER
    )  # seed 2: only names lofit does not write, so it runs through
    seed_links(env, rng, env.out, names)
    act: list[str] | Callable[[], object]
    if target in ("run", "select", "train"):
        act = getattr(env, target)()
    elif target == "eval":
        act = env.eval(env.out / rng.choice(["metrics.json", "notes"]))
    elif target.startswith("merge"):
        out = env.out if seed != 1 else env.out / rng.choice(["adapter", "select", "notes"])
        act = env.merge(out, *(["--overwrite"] if target.endswith("overwrite") else []))
    else:
        act = _python_save(env, target, env.out / rng.choice(["adapter", "heads.json", "notes", "model"]))
    links = {str(p): os.readlink(p) for p in env.out.rglob("*") if p.is_symlink()}
    before = snapshot(assets["root"])
    code, output = run_case(act, capsys)
    assert snapshot(assets["root"]) == before, f"changed: {changed_paths(before, snapshot(assets['root']))}"
    kept = {p: os.readlink(p) for p in links if os.path.islink(p)}
    assert {p: kept[p] for p in kept if p in links} == {p: links[p] for p in kept}, (
        "a link now points elsewhere"
    )
    replaced = sorted(Path(p).name for p in links if p not in kept)  # the link itself, never its destination
    assert target == "merge-overwrite" or not replaced, f"links removed without --overwrite: {replaced}"
    assert code in (0, 2) and "Traceback" not in output and "internal error" not in output, output
    record(
        {
            "category": "property",
            "case": f"{target}-{seed}",
            "verdict": "ok" if code == 0 else "clear",
            "exit": code,
        }
    )


def _python_save(env: Env, target: str, path: Path) -> Callable[[], object]:
    from transformers import AutoModelForCausalLM

    from lofit import LofitModel

    model = LofitModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(env.assets["llama"]), env.assets["adapter"]
    )
    if target == "save_pretrained":
        return lambda: model.save_pretrained(path)
    if target == "export_merged":
        from lofit.integrations.export import export_merged

        merged = model.merge_and_unload()
        return lambda: export_merged(merged, path, overwrite=True)
    from lofit.selection.ranking import HeadSelection

    selection = HeadSelection.load(env.assets["heads"])
    return lambda: selection.save(path)
