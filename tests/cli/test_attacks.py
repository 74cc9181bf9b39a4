"""Bad-input attacks on the command line: every case must exit 2 with one message that names the offending
option / file / field, never exit 1 ("internal error") or print a traceback, and never change an input file.

Cases run in-process through `lofit.cli.main.main` (fast); those marked `subprocess=True` also run through
`python -m lofit` in a fresh process. Categories: CLI options, data files, heads files, output paths,
adapters and models.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lofit.cli.main import main
from lofit.selection.ranking import HeadSelection, rank_heads
from lofit.selection.select import select_heads
from lofit.training.offsets import train_offsets
from tiny_models import tiny_model, tiny_tokenizer

RECORDS = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(3) for b in range(3)]
FAST = ["--epochs", "1", "--batch-size", "4", "--no-progress"]
DEEP = "[" * 200_000
RATE_PROBLEM = {"1e30": ("far too large",), "nan": ("finite",), "inf": ("finite",)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama on disk, good data files, a heads.json and an adapter for that model."""
    root = tmp_path_factory.mktemp("attack-assets")
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    paths = {"root": root, "llama": root / "llama"}
    paths["train"] = write_jsonl(root / "data" / "train.jsonl", RECORDS)
    em = [{"prompt": r["prompt"], "answers": [r["completion"]]} for r in RECORDS[:3]]
    paths["test"] = write_jsonl(root / "data" / "test.jsonl", em)
    selection = select_heads(model, tokenizer, RECORDS, epochs=1, progress=False)
    selection.save(root / "sel" / "heads.json")
    paths["heads"] = root / "sel" / "heads.json"
    adapter = train_offsets(model, tokenizer, RECORDS, selection.top(3), epochs=1, progress=False)
    adapter.save_pretrained(root / "adapter")
    paths["adapter"] = root / "adapter"
    return paths


def write_jsonl(path: Path, records: list[dict]) -> Path:  # type: ignore[type-arg]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@dataclass
class Env:
    """One case's directory, the shared assets and pytest's monkeypatch (for simulated failures)."""

    root: Path
    assets: dict[str, Path]
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.root / "out"

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    def fifo(self, name: str) -> Path:
        path = self.root / name
        os.mkfifo(path)
        return path

    def loop(self, name: str) -> Path:
        path = self.root / name
        path.symlink_to(path)
        return path

    def broken_link(self, name: str) -> Path:
        path = self.root / name
        path.symlink_to(self.root / "nowhere.jsonl")
        return path

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True)
        return path

    def copy(self, asset: str) -> Path:
        target = self.root / asset
        shutil.copytree(self.assets[asset], target)
        return target

    def edited_heads(self, edit: Callable[[dict], None]) -> Path:  # type: ignore[type-arg]
        data = json.loads(self.assets["heads"].read_text())
        edit(data)
        return self.file("heads.json", json.dumps(data))

    def select(self, *extra: str, train: Path | None = None, out: Path | None = None) -> list[str]:
        train = train if train is not None else self.assets["train"]
        return ["select", "--model", str(self.assets["llama"]), "--task", "sft", "--train", str(train),
                "--out", str(out or self.out), *FAST, *extra]  # fmt: skip

    def train(self, *extra: str, heads: Path | None = None, out: Path | None = None) -> list[str]:
        heads = heads if heads is not None else self.assets["heads"]
        return ["train", "--model", str(self.assets["llama"]), "--task", "sft", "--train", str(self.assets["train"]),
                "--heads", str(heads), "--k", "3", "--out", str(out or self.out), *FAST, *extra]  # fmt: skip

    def run(self, *extra: str, out: Path | None = None) -> list[str]:
        return ["run", "--model", str(self.assets["llama"]), "--task", "sft", "--train", str(self.assets["train"]),
                "--test", str(self.assets["test"]), "--out", str(out or self.out), "--k", "2", *FAST, *extra]  # fmt: skip

    def eval(self, *extra: str, test: Path | None = None, task: str = "exact_match",
             adapter: Path | None = None, model: Path | None = None) -> list[str]:  # fmt: skip
        args = ["eval", "--model", str(model or self.assets["llama"]), "--task", task, "--no-progress",
                "--test", str(test or self.assets["test"])]  # fmt: skip
        return [*args, "--adapter", str(adapter), *extra] if adapter is not None else [*args, *extra]

    def merge(self, out: Path, adapter: Path | None = None, model: Path | None = None) -> list[str]:
        return ["merge", "--model", str(model or self.assets["llama"]), "--adapter",
                str(adapter or self.assets["adapter"]), "--out", str(out)]  # fmt: skip


@dataclass
class Attack:
    category: str
    name: str
    build: Callable[[Env], list[str]]
    expect: tuple[str, ...]  # substrings of the one-paragraph message
    subprocess: bool = False
    needs_no_cuda: bool = False


# ------------------------------------------------------------------------------ CLI options
def option_attacks() -> list[Attack]:
    """Every bad option value, on every command that takes it."""
    values = [
        ("--max-train", "-1", ("--max-train -1", ">= 0")),
        ("--max-val", "-30", ("--max-val -30",)),
        ("--max-test", "-2", ("--max-test -2",)),
        ("--epochs", "0", ("--epochs 0", "epochs must be an integer >= 1")),
        ("--epochs", "-3", ("--epochs -3",)),
        ("--epochs", "two", ("argument --epochs", "'two'")),
        ("--batch-size", "0", ("--batch-size 0", "batch_size must be an integer >= 1")),
        ("--seed", "x", ("argument --seed",)),
        ("--beta", "0", ("--beta 0", "beta must be a finite number > 0")),
        ("--beta", "nan", ("--beta nan",)),
        ("--max-length", "1", ("--max-length 1", "at least 2")),
        ("--max-length", "-5", ("--max-length -5",)),
        ("--checkpoint-every", "-1", ("--checkpoint-every -1", "checkpoint_every must be an integer >= 0")),
        ("--k", "0", ("--k 0", "give a number of heads")),
        ("--k", "-2", ("--k -2",)),
        ("--k", "nan", ("--k nan",)),
        ("--k", "inf", ("--k inf",)),
        ("--k", "abc", ("--k abc",)),
        ("--k", "1.5", ("--k 1.5", "(0, 1]")),
        ("--k", "1000", ("--k 1000", "out of range")),
        ("--fold", "2", ("--fold 2", "folds 0 and 1")),
        ("--precision", "fp8", ("argument --precision", "fp8")),
        ("--quantization", "3bit", ("argument --quantization", "3bit")),
        ("--device-map", "nonsense", ("device_map", "nonsense")),
        ("--device-map", "cuda:7", ("device_map='cuda:7'", "CUDA")),
        ("--target-modules", " ", ("--target-modules",)),
    ]
    rates = {
        "select": [("--lr-select", "nan"), ("--lr-select", "inf"), ("--lr-select", "-0.1"), ("--lr-select", "0"),
                   ("--lr-select", "1e30"),
                   ("--l1", "-1"), ("--l1", "nan")],
        "train": [("--lr-train", "nan"), ("--lr-train", "-1"), ("--lr-train", "1e30")],
        "run": [("--lr-select", "nan"), ("--lr-train", "0"), ("--lr-train", "1e30"), ("--l1", "-0.5"),
                ("--eval-batch-size", "0")],
    }  # fmt: skip
    attacks = []
    for command in ("select", "train", "run"):
        cases = values + [
            (option, value, (f"{option} ", *RATE_PROBLEM.get(value, ()))) for option, value in rates[command]
        ]
        for option, value, expect in cases:
            if command == "select" and option == "--k" and value == "1000":
                continue  # select only marks k heads on its heatmap; the k check is the same as in run
            attacks.append(
                Attack("options", f"{command}{option}={value}",
                       lambda env, c=command, o=option, v=value: getattr(env, c)(f"{o}={v}"), expect,
                       needs_no_cuda=value.startswith("cuda"))
            )  # fmt: skip
    attacks += [
        Attack("options", "eval--max-test=-2", lambda env: env.eval("--max-test=-2"), ("--max-test -2",)),
        Attack("options", "eval--eval-batch-size=0", lambda env: env.eval("--eval-batch-size", "0"),
               ("--eval-batch-size 0",)),
        Attack("options", "eval--split=train", lambda env: env.eval("--split", "train"), ("argument --split",)),
        Attack("options", "eval--device-map=cuda", lambda env: env.eval("--device-map", "cuda"),
               ("device_map='cuda'", "no CUDA GPU is visible"), needs_no_cuda=True),
        Attack("options", "merge--dtype=fp64", lambda env: [*env.merge(env.out), "--dtype", "fp64"],
               ("argument --dtype", "fp64")),
        Attack("options", "select-no-task", lambda env: [a for a in env.select() if a not in ("--task", "sft")],
               ("--task",)),
        Attack("options", "select-unknown-task", lambda env: [*env.select(), "--task", "nope"], ("unknown task 'nope'",)),
        Attack("options", "select-sft-without-train",
               lambda env: ["select", "--task", "sft", "--out", str(env.out)], ("pass train_file (--train)",)),
        Attack("options", "run-sft-without-test",
               lambda env: ["run", "--task", "sft", "--train", str(env.assets["train"]), "--out", str(env.out)],
               ("pass test_file (--test)",)),
        Attack("options", "select-max-train-0", lambda env: env.select("--max-train", "0"),
               ("train_data is empty after --max-train 0",)),
        Attack("options", "run-max-train-negative-subprocess", lambda env: env.run("--max-train=-1"),
               ("--max-train -1",), subprocess=True),
    ]  # fmt: skip
    return attacks


# ------------------------------------------------------------------------------ data files
def data_attacks() -> list[Attack]:
    good = json.dumps(RECORDS[0])
    mc = '{"question": "q", "choices": ["a", "b"], "answer": 0}'
    train_cases = [
        ("deep-json", "t.json", DEEP, ("t.json", "nested too deeply")),
        ("deep-jsonl-line", "t.jsonl", DEEP + "\n", ("t.jsonl, line 1", "nested too deeply")),
        ("deep-jsonl-field", "t.jsonl", good + '\n{"prompt": ' + DEEP + "\n", ("t.jsonl, line 2", "nested too deeply")),
        ("duplicate-data-key", "t.json", '{"data": [' + good + '], "data": []}', ("t.json", "'data'", "twice")),
        ("duplicate-record-key", "t.jsonl", '{"prompt": "a", "prompt": "b", "completion": "c"}\n',
         ("t.jsonl, line 1, field 'prompt'", "twice")),
        ("malformed-jsonl", "t.jsonl", good + "\n{oops\n", ("t.jsonl, line 2", "invalid JSON")),
        ("truncated-json", "t.json", "[" + good + ",", ("t.json", "invalid JSON")),
        ("json-number", "t.json", "42", ("t.json", "list of records")),
        ("jsonl-line-is-a-list", "t.jsonl", '["prompt", "completion"]\n', ("t.jsonl, line 1", "JSON object")),
        ("missing-completion", "t.jsonl", '{"prompt": "a"}\n', ("t.jsonl, line 1", "cannot tell the record format")),
        ("completion-int", "t.jsonl", '{"prompt": "a", "completion": 5}\n', ("field 'completion'", "must be a string")),
        ("completion-empty", "t.jsonl", '{"prompt": "a", "completion": "  "}\n', ("field 'completion'", "is empty")),
        ("prompt-null", "t.jsonl", '{"prompt": null, "completion": "b"}\n', ("field 'prompt'", "missing")),
        ("empty-file", "t.jsonl", "", ("t.jsonl", "holds no records")),
        ("whitespace-only", "t.jsonl", "\n  \n\t\n", ("t.jsonl", "holds no records")),
        ("not-utf8", "t.jsonl", b'{"prompt": "\xff"}\n', ("t.jsonl, line 1", "not UTF-8")),
        ("unsupported-suffix", "t.txt", good, ("t.txt", "unsupported file type '.txt'")),
        ("no-suffix", "train", good, ("train", "unsupported file type '(no suffix)'")),
        ("csv-ragged-row", "t.csv", "prompt,completion\na,b,c\n", ("t.csv, line 2", "3 cells")),
        ("csv-duplicate-header", "t.csv", "prompt,prompt\na,b\n", ("t.csv, line 1, field 'prompt'", "twice")),
        ("csv-empty-header", "t.csv", "prompt,,completion\na,b,c\n", ("t.csv, line 1", "empty column name")),
        ("mc-as-training-answer-bool", "t.jsonl", mc.replace('"answer": 0', '"answer": true') + "\n",
         ("field 'answer'", "must be an integer")),
    ]  # fmt: skip
    attacks = [
        Attack(
            "data", f"train-{name}", lambda env, n=fname, c=content: env.select(train=env.file(n, c)), expect
        )
        for name, fname, content, expect in train_cases
    ]
    test_cases = [
        ("mc-answer-out-of-range", "mc", "m.jsonl", mc.replace('"answer": 0', '"answer": 5') + "\n",
         ("m.jsonl, line 1, field 'answer'", "out of range")),
        ("mc-answer-negative", "mc", "m.jsonl", mc.replace('"answer": 0', '"answer": -1') + "\n",
         ("field 'answer'", "out of range")),
        ("mc-one-choice", "mc", "m.jsonl", '{"question": "q", "choices": ["a"], "answer": 0}\n',
         ("field 'choices'", "only 1 choice")),
        ("mc-choices-string", "mc", "m.jsonl", '{"question": "q", "choices": "a;b", "answer": 0}\n',
         ("field 'choices'", "must be a list")),
        ("mc-csv-deep-list-cell", "mc", "m.csv", f'question,choices,answer\nq,"{DEEP}",0\n',
         ("m.csv, line 2, field 'choices'", "nested too deeply")),
        ("em-answers-empty", "exact_match", "e.jsonl", '{"prompt": "q", "answers": []}\n',
         ("field 'answers'", "empty list")),
        ("em-answers-not-strings", "exact_match", "e.jsonl", '{"prompt": "q", "answers": [1]}\n',
         ("field 'answers'", "entry 0 must be a string")),
        ("em-prompt-empty", "exact_match", "e.jsonl", '{"prompt": "", "answers": ["a"]}\n',
         ("field 'prompt'", "is empty")),
    ]  # fmt: skip
    attacks += [
        Attack("data", f"test-{name}", lambda env, t=task, n=fname, c=content: env.eval(task=t, test=env.file(n, c)),
               expect)
        for name, task, fname, content, expect in test_cases
    ]  # fmt: skip
    attacks += [
        Attack("data", "train-fifo", lambda env: env.select(train=env.fifo("t.jsonl")), ("t.jsonl", "FIFO"),
               subprocess=True),
        Attack("data", "train-symlink-loop", lambda env: env.select(train=env.loop("t.jsonl")), ("t.jsonl", "symlink loop")),
        Attack("data", "train-directory", lambda env: env.select(train=env.folder("t.jsonl")), ("t.jsonl", "is a directory")),
        Attack("data", "train-broken-symlink", lambda env: env.select(train=env.broken_link("t.jsonl")),
               ("t.jsonl", "broken symlink")),
        Attack("data", "train-missing", lambda env: env.select(train=env.root / "nope.jsonl"), ("nope.jsonl", "not found")),
        Attack("data", "test-fifo", lambda env: env.eval(test=env.fifo("e.jsonl")), ("e.jsonl", "FIFO")),
        Attack("data", "test-symlink-loop", lambda env: env.eval(test=env.loop("e.jsonl")), ("e.jsonl", "symlink loop")),
        Attack("data", "val-directory", lambda env: env.select("--val", str(env.folder("v.jsonl"))),
               ("v.jsonl", "is a directory")),
        Attack("data", "deep-json-subprocess", lambda env: env.select(train=env.file("t.json", DEEP)),
               ("t.json", "nested too deeply"), subprocess=True),
        Attack("data", "data-dir-missing", lambda env: ["select", "--task", "mquake", "--data-dir",
                                                         str(env.root / "nodata"), "--out", str(env.out)],
               ("nodata",)),
    ]  # fmt: skip
    return attacks


# ------------------------------------------------------------------------------ heads files
def heads_attacks() -> list[Attack]:
    def other_shape(env: Env) -> Path:
        scores = torch.rand(5, 4, generator=torch.Generator().manual_seed(0))
        path = env.root / "heads.json"
        HeadSelection(scores, rank_heads(scores), "lofit").save(path)
        return path

    edits: list[tuple[str, Callable[[dict], None], tuple[str, ...]]] = [  # type: ignore[type-arg]
        ("wrong-format", lambda d: d.update(format="x"), ("heads.json", "not a head-selection file")),
        ("version-99", lambda d: d.update(version=99), ("heads.json", "version 99")),
        ("missing-scores", lambda d: d.pop("scores"), ("heads.json", "missing field 'scores'")),
        ("missing-ranking", lambda d: d.pop("ranking"), ("heads.json", "missing field 'ranking'")),
        ("scores-nan", lambda d: d["scores"][0].__setitem__(0, float("nan")), ("heads.json", "NaN")),
        ("scores-1d", lambda d: d.update(scores=[1.0, 2.0]), ("heads.json", "scores")),
        ("scores-strings", lambda d: d.update(scores=[["a", "b"]]), ("heads.json",)),
        ("ranking-duplicates", lambda d: d["ranking"].__setitem__(1, d["ranking"][0]), ("heads.json", "ranking")),
        ("ranking-strings", lambda d: d["ranking"].__setitem__(0, ["0", "1"]), ("heads.json", "ranking")),
        ("ranking-out-of-range", lambda d: d["ranking"].__setitem__(0, [99, 0]), ("heads.json", "ranking")),
        ("num-layers-mismatch", lambda d: d.update(num_layers=7), ("heads.json", "num_layers=7")),
        ("top-level-list", lambda d: d.clear(), ("heads.json",)),
    ]  # fmt: skip
    attacks = [
        Attack("heads", f"heads-{name}", lambda env, e=edit: env.train(heads=env.edited_heads(e)), expect)
        for name, edit, expect in edits
    ]
    attacks += [
        Attack("heads", "heads-deep-nesting", lambda env: env.train(heads=env.file("heads.json", DEEP)),
               ("heads.json", "nested too deeply"), subprocess=True),
        Attack("heads", "heads-not-json", lambda env: env.train(heads=env.file("heads.json", "{oops")),
               ("heads.json", "not valid JSON")),
        Attack("heads", "heads-empty", lambda env: env.train(heads=env.file("heads.json", "")), ("heads.json",)),
        Attack("heads", "heads-other-model-shape", lambda env: env.train(heads=other_shape(env)),
               ("heads.json", "5 layers x 4 heads", "has 3 x 4")),
        Attack("heads", "heads-fifo", lambda env: env.train(heads=env.fifo("heads.json")), ("--heads", "FIFO")),
        Attack("heads", "heads-directory", lambda env: env.train(heads=env.folder("heads.json")),
               ("--heads", "is a directory")),
        Attack("heads", "heads-symlink-loop", lambda env: env.train(heads=env.loop("heads.json")),
               ("--heads", "symlink loop")),
        Attack("heads", "heads-missing", lambda env: env.train(heads=env.root / "none.json"), ("--heads", "none.json")),
        Attack("heads", "heads-k-too-large", lambda env: [*env.train(), "--k", "100"], ("--k 100", "out of range")),
        Attack("heads", "heads-k-fraction-above-1", lambda env: [*env.train(), "--k", "1.5"], ("--k 1.5",)),
    ]  # fmt: skip
    return attacks


# ------------------------------------------------------------------------------ output paths
def output_attacks() -> list[Attack]:
    def linked(env: Env, target: Path) -> Path:
        link = env.root / "link"
        link.symlink_to(target)
        return link

    is_input = "lofit never writes where it reads"
    return [
        Attack("outputs", "merge-out-is-model", lambda env: env.merge(env.assets["llama"]),
               ("--out", "is the input --model", is_input), subprocess=True),
        Attack("outputs", "merge-out-inside-model", lambda env: env.merge(env.assets["llama"] / "merged"),
               ("lies inside the input --model",)),
        Attack("outputs", "merge-out-is-adapter", lambda env: env.merge(env.assets["adapter"]), ("is the input --adapter",)),
        Attack("outputs", "merge-out-contains-adapter", lambda env: env.merge(env.assets["root"]),
               ("contains the input --model",)),
        Attack("outputs", "merge-out-symlink-to-model", lambda env: env.merge(linked(env, env.assets["llama"])),
               ("is the input --model",)),
        Attack("outputs", "eval-out-is-test", lambda env: env.eval("--out", str(env.assets["test"])),
               ("is the input --test", is_input), subprocess=True),
        Attack("outputs", "eval-out-is-adapter", lambda env: env.eval("--out", str(env.assets["adapter"]),
                                                                       adapter=env.assets["adapter"]),
               ("is the input --adapter",)),
        Attack("outputs", "eval-out-inside-adapter",
               lambda env: env.eval("--out", str(env.assets["adapter"] / "m.json"), adapter=env.assets["adapter"]),
               ("lies inside the input --adapter",)),
        Attack("outputs", "eval-out-inside-model", lambda env: env.eval("--out", str(env.assets["llama"] / "m.json")),
               ("lies inside the input --model",)),
        Attack("outputs", "eval-out-existing-dir", lambda env: env.eval("--out", str(env.folder("results"))),
               ("--out", "is a directory", "metrics.json")),
        Attack("outputs", "eval-out-under-a-file", lambda env: env.eval("--out", str(env.file("f.txt", "x") / "m.json")),
               ("f.txt is a file",)),
        Attack("outputs", "select-out-is-train", lambda env: env.select(out=env.assets["train"]), ("is the input --train",)),
        Attack("outputs", "select-out-contains-train", lambda env: env.select(out=env.assets["train"].parent),
               ("contains the input --train",)),
        Attack("outputs", "select-out-is-model", lambda env: env.select(out=env.assets["llama"]), ("is the input --model",)),
        Attack("outputs", "select-out-symlink-to-data", lambda env: env.select(out=linked(env, env.assets["train"].parent)),
               ("contains the input --train",)),
        Attack("outputs", "train-out-contains-heads", lambda env: env.train(out=env.assets["heads"].parent),
               ("contains the input --heads",)),
        Attack("outputs", "train-out-is-heads", lambda env: env.train(out=env.assets["heads"]), ("is the input --heads",)),
        Attack("outputs", "run-out-is-test", lambda env: env.run(out=env.assets["test"]), ("is the input --test",)),
        Attack("outputs", "run-out-is-data-dir",
               lambda env: env.run("--data-dir", str(env.assets["train"].parent), out=env.assets["train"].parent),
               ("the input --train",)),
        Attack("outputs", "run-out-inside-model", lambda env: env.run(out=env.assets["llama"] / "run"),
               ("lies inside the input --model",)),
        Attack("outputs", "select-out-under-a-file", lambda env: env.select(out=env.file("f.txt", "x") / "o"),
               ("cannot write to the output directory", "f.txt")),
    ]  # fmt: skip


# ------------------------------------------------------------------------------ adapters and models
def model_attacks() -> list[Attack]:
    def adapter_config(env: Env, edit: Callable[[dict], None]) -> Path:  # type: ignore[type-arg]
        adapter = env.copy("adapter")
        path = adapter / "lofit_config.json"
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
        return adapter

    def replaced_config(env: Env, text: str) -> Path:
        adapter = env.copy("adapter")
        (adapter / "lofit_config.json").write_text(text)
        return adapter

    def disk_full_merge(env: Env) -> list[str]:
        def half_then_full(tensors, filename, metadata=None):  # type: ignore[no-untyped-def]
            Path(filename).write_bytes(b"\x00" * 64)
            raise OSError(errno.ENOSPC, "No space left on device")

        env.monkeypatch.setattr("transformers.modeling_utils.safe_save_file", half_then_full)
        return env.merge(env.root / "merged")

    def unknown_model_type(env: Env) -> Path:
        model = env.copy("llama")
        config = json.loads((model / "config.json").read_text())
        config["model_type"] = "no_such_arch"
        (model / "config.json").write_text(json.dumps(config))
        return model

    return [
        Attack("models", "adapter-missing", lambda env: env.eval(adapter=env.root / "none"), ("--adapter", "none")),
        Attack("models", "adapter-is-a-file", lambda env: env.eval(adapter=env.file("a.txt", "x")),
               ("--adapter", "is a file, not a directory")),
        Attack("models", "adapter-symlink-loop", lambda env: env.eval(adapter=env.loop("ad")), ("--adapter", "symlink loop")),
        Attack("models", "adapter-config-deep", lambda env: env.eval(adapter=replaced_config(env, DEEP)),
               ("lofit_config.json", "nested too deeply")),
        Attack("models", "adapter-config-not-json", lambda env: env.eval(adapter=replaced_config(env, "{")),
               ("lofit_config.json", "not valid JSON")),
        Attack("models", "adapter-config-empty-object",
               lambda env: env.eval(adapter=adapter_config(env, lambda d: d.clear())), ("lofit_config.json",)),
        Attack("models", "adapter-fingerprint-not-a-dict",
               lambda env: env.eval(
                   adapter=adapter_config(env, lambda d: d["base_model"].update(projection_fingerprint="abc"))
               ),
               ("lofit_config.json", "projection_fingerprint")),
        Attack("models", "merge-adapter-missing", lambda env: env.merge(env.root / "m", adapter=env.root / "none"),
               ("--adapter", "none")),
        Attack("models", "merge-disk-full", disk_full_merge,
               ("cannot write the merged checkpoint", "No space left on device", "--out")),
        Attack("models", "model-is-a-file", lambda env: env.select("--model", str(env.file("m.bin", "x"))),
               ("m.bin",)),
        Attack("models", "model-dir-empty", lambda env: env.select("--model", str(env.folder("empty-model"))),
               ("empty-model",)),
        Attack("models", "model-unknown-type", lambda env: env.select("--model", str(unknown_model_type(env))),
               ("no_such_arch",)),
    ]  # fmt: skip


ATTACKS = option_attacks() + data_attacks() + heads_attacks() + output_attacks() + model_attacks()


def test_there_are_at_least_100_distinct_attacks() -> None:
    assert len(ATTACKS) >= 100 and len({a.name for a in ATTACKS}) == len(ATTACKS)


def file_hashes(*roots: Path) -> dict[Path, str]:
    """sha256 of every regular file under `roots` (FIFOs, loops and dangling links skipped)."""
    hashes = {}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_symlink() or not path.is_file():
                continue
            hashes[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def run_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse refuses the value itself
        code = int(stop.code or 0)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack(
    attack: Attack,
    assets: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if attack.needs_no_cuda and torch.cuda.is_available():
        pytest.skip("this machine has CUDA GPUs, so the device exists")
    env = Env(tmp_path, assets, monkeypatch)
    argv = attack.build(env)
    before = file_hashes(assets["root"], tmp_path)
    code, output = run_in_process(argv, capsys)
    assert "Traceback" not in output and "internal error" not in output, output
    assert code == 2, output
    message = output.strip().splitlines()[-1]
    assert message.startswith(f"lofit {argv[0]}: error:"), output
    for text in attack.expect:
        assert text in message, message
    after = file_hashes(assets["root"], tmp_path)
    assert {p: h for p, h in after.items() if p in before} == before, "an input file changed"
    assert set(after) <= set(before), f"files written: {sorted(set(after) - set(before))}"


SUBPROCESS_ATTACKS = [a for a in ATTACKS if a.subprocess]


@pytest.mark.parametrize("attack", SUBPROCESS_ATTACKS, ids=[a.name for a in SUBPROCESS_ATTACKS])
def test_attack_in_a_fresh_process(
    attack: Attack, assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same attacks through `python -m lofit`: exit status 2 and no traceback, inputs unchanged."""
    env = Env(tmp_path, assets, monkeypatch)
    argv = attack.build(env)
    before = file_hashes(assets["root"], tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "lofit", *argv], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    for text in attack.expect:
        assert text in result.stderr, result.stderr
    assert file_hashes(assets["root"], tmp_path) == before


def test_json_lines_split_on_newline_only(tmp_path: Path) -> None:
    """U+2028, U+2029 and U+0085 are valid inside JSON strings; the reader must not split records there."""
    from lofit.tasks import load_records

    texts = ["a\u2028b", "c\u0085d", "e\u2029f", "g\x1ch"]
    path = tmp_path / "t.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": t, "completion": t}, ensure_ascii=False) + "\r\n" for t in texts)
    )
    records = load_records(path, "sft")
    assert [r["prompt"] for r in records] == texts


def test_attack_categories_are_covered() -> None:
    counts: dict[str, int] = {}
    for attack in ATTACKS:
        counts[attack.category] = counts.get(attack.category, 0) + 1
    assert set(counts) == {"options", "data", "heads", "outputs", "models"}
    assert min(counts.values()) >= 10, counts
