"""The bad-input corpus: every case runs `lofit ...` in-process on tiny models saved to disk and must end
in one clear message naming what to fix (exit 2), or in a documented safe behaviour (exit 0), never in a
Python traceback, and never leave a partial or temporary file behind.

Each `Case` builds its inputs in a fresh directory and returns the command line. Documented safe
behaviours: a prompt longer than --max-length is cut from the left (with a warning) and training goes on.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, XGLMConfig

from lofit.cli.main import main
from lofit.selection.ranking import HeadSelection, rank_heads
from lofit.selection.select import select_heads
from lofit.training.offsets import train_offsets
from tiny_models import EOS_ID, PAD_ID, tiny_model, tiny_tokenizer

RECORDS = [{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(4) for b in range(3)]
FAST = ["--epochs", "1", "--batch-size", "4", "--no-progress"]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models on disk, good data files, a head selection and an adapter trained on `llama`."""
    root = tmp_path_factory.mktemp("assets")
    tokenizer = tiny_tokenizer()
    nan_llama = tiny_model("llama")
    with torch.no_grad():
        nan_llama.model.embed_tokens.weight.fill_(float("nan"))
    torch.manual_seed(0)
    xglm = AutoModelForCausalLM.from_config(
        XGLMConfig(
            vocab_size=128, d_model=32, ffn_dim=64, num_layers=2, attention_heads=4,
            max_position_embeddings=128, pad_token_id=PAD_ID, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
        )
    )  # fmt: skip
    models = {
        "llama": tiny_model("llama"),
        "llama_seed1": tiny_model("llama", seed=1),
        "gpt2": tiny_model("gpt2"),
        "xglm": xglm,
        "nan_llama": nan_llama,
    }
    paths: dict[str, Path] = {}
    for name, model in models.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    paths["train"] = write_jsonl(root / "train.jsonl", RECORDS)
    paths["test"] = write_jsonl(
        root / "test.jsonl", [{"prompt": r["prompt"], "answers": [r["completion"]]} for r in RECORDS[:4]]
    )
    selection = select_heads(models["llama"], tokenizer, RECORDS, epochs=1, progress=False)
    selection.save(root / "heads.json")
    paths["heads"] = root / "heads.json"
    adapter = train_offsets(models["llama"], tokenizer, RECORDS, selection.top(3), epochs=1, progress=False)
    adapter.save_pretrained(root / "adapter")
    paths["adapter"] = root / "adapter"
    return paths


def write_jsonl(path: Path, records: list[dict]) -> Path:  # type: ignore[type-arg]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@dataclass
class Workspace:
    """One case's directory, the shared assets, and pytest's monkeypatch for simulated failures."""

    root: Path
    assets: dict[str, Path]
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.root / "out"

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def copy(self, asset: str) -> Path:
        target = self.root / asset
        shutil.copytree(self.assets[asset], target)
        return target

    def select(
        self, *extra: str, train: Path | None = None, model: Path | None = None, task: str = "sft"
    ) -> list[str]:
        model = model if model is not None else self.assets["llama"]
        train = train if train is not None else self.assets["train"]
        return ["select", "--model", str(model), "--task", task, "--train", str(train), "--out", str(self.out),
                *FAST, *extra]  # fmt: skip

    def train(self, *extra: str, heads: Path | None = None, model: Path | None = None) -> list[str]:
        heads = heads if heads is not None else self.assets["heads"]
        model = model if model is not None else self.assets["llama"]
        return ["train", "--model", str(model), "--task", "sft", "--train", str(self.assets["train"]),
                "--heads", str(heads), "--k", "3", "--out", str(self.out), *FAST, *extra]  # fmt: skip

    def eval(self, *extra: str, adapter: Path | None = None, model: Path | None = None,
             task: str = "exact_match", test: Path | None = None) -> list[str]:  # fmt: skip
        args = ["eval", "--model", str(model or self.assets["llama"]), "--task", task, "--no-progress",
                "--test", str(test or self.assets["test"])]  # fmt: skip
        return [*args, "--adapter", str(adapter)] if adapter is not None else [*args, *extra]


@dataclass
class Case:
    name: str
    build: Callable[[Workspace], list[str]]
    expect: tuple[str, ...]  # substrings of the error message (or of stdout for exit 0)
    exit_code: int = 2
    damaged: str | None = None  # an output the case itself damaged on purpose (not checked as complete)


# --------------------------------------------------------------------------------- case builders
def selection_file(ws: Workspace, layers: int, heads: int, best: tuple[int, int]) -> Path:
    scores = torch.rand(layers, heads, generator=torch.Generator().manual_seed(0))
    scores[best] = 10.0  # this head is ranked first
    path = ws.root / "heads.json"
    HeadSelection(scores, rank_heads(scores), "lofit").save(path)
    return path


def edited_json(path: Path, edit: Callable[[dict], None]) -> Path:  # type: ignore[type-arg]
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def replaced(path: Path, content: str | bytes) -> Path:
    """Overwrite `path` (a file inside a copied asset) and return the asset's directory."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path.parent


def nan_loss_at_step_2(ws: Workspace) -> list[str]:
    from lofit.training.losses import SFTObjective

    loss, calls = SFTObjective.loss, []

    def second_call_nan(self, scorer, examples, device):  # type: ignore[no-untyped-def]
        out = loss(self, scorer, examples, device)
        calls.append(1)
        if len(calls) == 2:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    ws.monkeypatch.setattr(SFTObjective, "loss", second_call_nan)
    return ws.train("--checkpoint-every", "1")


def pickle_only_model(ws: Workspace) -> list[str]:
    model = ws.copy("llama")
    weights = load_file(str(model / "model.safetensors"))
    torch.save(weights, model / "pytorch_model.bin")  # what an old checkpoint looks like: a pickle
    (model / "model.safetensors").unlink()
    return ws.select(model=model)


def disk_full_on_fsync(ws: Workspace) -> list[str]:
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    ws.monkeypatch.setattr("lofit.io.atomic.os.fsync", no_space)
    return ws.train()


def disk_full_writing_the_adapter(ws: Workspace) -> list[str]:
    def half_then_full(tensors, path, metadata=None):  # type: ignore[no-untyped-def]
        Path(path).write_bytes(b"\x00" * 100)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    ws.monkeypatch.setattr("lofit.adapters.persistence.save_file", half_then_full)
    return ws.train()


def permission_denied(ws: Workspace) -> list[str]:
    def denied(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise PermissionError(errno.EACCES, "Permission denied")

    ws.monkeypatch.setattr("tempfile.TemporaryFile", denied)
    return ws.select()


def no_bitsandbytes(ws: Workspace) -> list[str]:
    ws.monkeypatch.setattr("lofit.io.loading.importlib.util.find_spec", lambda name: None)
    return ws.select("--quantization", "4bit")


def checkpointed_then(ws: Workspace, *extra: str) -> list[str]:
    assert main(ws.train("--checkpoint-every", "2")) == 0
    shutil.rmtree(ws.out / "adapter")
    return ws.train("--checkpoint-every", "2", *extra)


def corrupt_checkpoint_then_resume(ws: Workspace) -> list[str]:
    assert main(ws.train("--checkpoint-every", "2")) == 0
    shutil.rmtree(ws.out / "adapter")
    [checkpoint] = (ws.out / "train" / "checkpoints").iterdir()
    truncated(checkpoint / "state.safetensors")
    return ws.train("--checkpoint-every", "2", "--resume")


BAD = json.dumps(RECORDS[0]) + "\n"
CASES = [
    # ---- data files
    Case("malformed-jsonl", lambda ws: ws.select(train=ws.file("train.jsonl", BAD + "{not json\n")),
         ("train.jsonl, line 2",)),
    Case("missing-field", lambda ws: ws.select(train=ws.file("train.jsonl", '{"prompt": "a"}\n')),
         ("train.jsonl, line 1", "cannot tell the record format", "'completion'")),
    Case("wrong-type", lambda ws: ws.select(train=ws.file("train.jsonl", '{"prompt": "a", "completion": 5}\n')),
         ("field 'completion': must be a string",)),
    Case("empty-file", lambda ws: ws.select(train=ws.file("train.jsonl", "")), ("train.jsonl", "holds no records")),
    Case("not-utf8", lambda ws: ws.select(train=ws.file("train.jsonl", b"\xff\xfe\x00bad")),
         ("train.jsonl", "not UTF-8")),
    Case("csv-missing-column", lambda ws: ws.select(train=ws.file("train.csv", "prompt\nhello\n")),
         ("train.csv, line 2", "cannot tell the record format")),
    Case("json-not-a-list", lambda ws: ws.select(train=ws.file("train.json", '{"a": 1}')),
         ("train.json", "must hold a list of records")),
    Case("empty-completion", lambda ws: ws.select(train=ws.file("train.jsonl", '{"prompt": "a", "completion": ""}\n')),
         ("field 'completion': is empty",)),
    Case("missing-train-file", lambda ws: ws.select(train=ws.root / "nope.jsonl"), ("nope.jsonl",)),
    Case("unknown-task", lambda ws: ws.select(task="nosuchtask"), ("unknown task 'nosuchtask'",)),
    Case("dpo-missing-rejected",
         lambda ws: ws.select(task="dpo", train=ws.file("dpo.jsonl", '{"prompt": "a", "chosen": "b"}\n')),
         ("dpo.jsonl, line 1",)),
    Case("mc-answer-out-of-range",
         lambda ws: ws.eval(task="mc", test=ws.file("mc.jsonl", '{"question": "q", "choices": ["a", "b", "c"], "answer": 5}\n')),
         ("mc.jsonl, line 1, field 'answer': 5 is out of range for 3 choices",)),
    Case("answers-not-a-list",
         lambda ws: ws.eval(task="exact_match", test=ws.file("em.jsonl", '{"prompt": "q", "answers": "a"}\n')),
         ("em.jsonl, line 1, field 'answers': must be a list of strings",)),
    Case("no-training-records", lambda ws: ws.select("--max-train", "0"), ("train_data is empty",)),
    # ---- lengths
    Case("prompt-longer-than-the-model-accepts",
         lambda ws: ws.select(train=ws.file("long.jsonl", json.dumps({"prompt": "x" * 300, "completion": "b"}) + "\n")),
         ("train record 0 is 302 tokens long, more than the 128 positions", "--max-length")),
    Case("prompt-longer-than-max-length-is-truncated",  # documented safe behaviour
         lambda ws: ws.select("--max-length", "16",
                              train=ws.file("long.jsonl", json.dumps({"prompt": "x" * 300, "completion": "b"}) + "\n")),
         ("top heads:",), exit_code=0),
    Case("max-length-too-small", lambda ws: ws.select("--max-length", "1"), ("max_length must be at least 2",)),
    # ---- options
    Case("k-zero", lambda ws: ws.select("--k", "0"), ("--k 0: give a number of heads",)),
    Case("k-negative", lambda ws: ws.select("--k=-3"), ("--k -3: give a number of heads",)),
    Case("k-more-than-all-heads", lambda ws: ws.select("--k", "100"),
         ("k=100 heads is out of range; this model has 12 heads",)),
    Case("lr-nan", lambda ws: ws.select("--lr-select", "nan"), ("lr must be a finite number",)),
    Case("epochs-zero", lambda ws: [*ws.select(), "--epochs", "0"], ("epochs must be an integer >= 1",)),
    Case("negative-checkpoint-every", lambda ws: ws.select("--checkpoint-every", "-1"),
         ("checkpoint_every must be an integer >= 0",)),
    # ---- head selections
    Case("heads-layer-out-of-range", lambda ws: ws.train(heads=selection_file(ws, 5, 4, (4, 0))),
         ("heads.json: this head selection is for a model with 5 layers x 4 heads", "has 3 x 4")),
    Case("heads-index-out-of-range", lambda ws: ws.train(heads=selection_file(ws, 3, 8, (1, 7))),
         ("heads.json: this head selection is for a model with 3 layers x 8 heads", "has 3 x 4")),
    Case("heads-file-corrupt", lambda ws: ws.train(heads=ws.file("heads.json", "{oops")),
         ("heads.json: not valid JSON",)),
    Case("heads-file-missing-field",
         lambda ws: ws.train(heads=edited_json(Path(shutil.copy(ws.assets["heads"], ws.root)), lambda d: d.pop("ranking"))),
         ("heads.json: missing field 'ranking'",)),
    Case("heads-file-of-another-kind", lambda ws: ws.train(heads=ws.file("heads.json", '{"format": "x"}')),
         ("heads.json: not a head-selection file",)),
    # ---- models
    Case("unknown-architecture", lambda ws: ws.select(model=ws.assets["xglm"]),
         ("model_type 'xglm' has no known attention output projection",)),
    Case("model-path-missing", lambda ws: ws.select(model=ws.root / "no-model"), ("does not exist",)),
    Case("model-config-corrupt",
         lambda ws: ws.select(model=replaced(ws.copy("llama") / "config.json", "{bad")),
         ("config.json", "not a valid JSON")),
    Case("model-weights-truncated",
         lambda ws: ws.select(model=truncated(ws.copy("llama") / "model.safetensors").parent),
         ("weights file is corrupt or truncated",)),
    Case("model-pickle-only", pickle_only_model, ("no safetensors weights", "never loads pickled")),
    Case("quantization-without-bitsandbytes", no_bitsandbytes, ("pip install 'lofit[quantization]'",)),
    Case("device-map-unknown", lambda ws: ws.select("--device-map", "nonsense"), ("device_map", "nonsense")),
    # ---- adapters
    Case("adapter-corrupt",
         lambda ws: ws.eval(adapter=replaced(ws.copy("adapter") / "lofit_model.safetensors", b"junk" * 9)),
         ("lofit_model.safetensors: cannot read safetensors", "corrupt or truncated")),
    Case("adapter-truncated", lambda ws: ws.eval(adapter=truncated(ws.copy("adapter") / "lofit_model.safetensors").parent),
         ("lofit_model.safetensors: cannot read safetensors",)),
    Case("adapter-config-corrupt",
         lambda ws: ws.eval(adapter=replaced(ws.copy("adapter") / "lofit_config.json", "{")),
         ("lofit_config.json: not valid JSON",)),
    Case("adapter-config-wrong-type",
         lambda ws: ws.eval(adapter=edited_json(ws.copy("adapter") / "lofit_config.json",
                                                lambda d: d["adapter"].update(heads="all")).parent),
         ("lofit_config.json: field 'adapter' is invalid",)),
    Case("adapter-for-another-base-model", lambda ws: ws.eval(adapter=ws.assets["adapter"], model=ws.assets["llama_seed1"]),
         ("differ from those this adapter was trained on",)),
    Case("adapter-for-another-architecture", lambda ws: ws.eval(adapter=ws.assets["adapter"], model=ws.assets["gpt2"]),
         ("this adapter was trained for a llama model",)),
    Case("adapter-missing", lambda ws: ws.eval(adapter=ws.root / "no-adapter"), ("lofit_config.json not found",)),
    # ---- outputs
    Case("output-under-a-file", lambda ws: [*ws.select()[:-len(FAST) - 2], "--out", str(ws.file("f.txt", "x") / "out"),
                                            *FAST], ("cannot write to the output directory", "f.txt/out")),
    Case("output-permission-denied", permission_denied, ("cannot write to the output directory", "Permission denied")),
    Case("disk-full", disk_full_on_fsync, ("No space left on device", "cannot write")),
    Case("disk-full-writing-the-adapter", disk_full_writing_the_adapter,
         ("cannot write", "out/adapter: No space left on device")),
    # ---- training and checkpoints
    Case("nan-loss", lambda ws: ws.train(model=ws.assets["nan_llama"]),
         ("train offsets: the loss became nan at step 1 (epoch 1); training stopped. Lower lr",)),
    Case("nan-loss-after-a-checkpoint", nan_loss_at_step_2,
         ("the loss became nan at step 2", "The last good checkpoint (step-00000001) is kept in")),
    Case("resume-with-other-options", lambda ws: checkpointed_then(ws, "--resume", "--lr-train", "0.5"),
         ("this checkpoint was written by a run with lr=0.01, but this run has lr=0.5",)),
    Case("resume-from-a-corrupt-checkpoint", corrupt_checkpoint_then_resume,
         ("state.safetensors: cannot read safetensors",), damaged="checkpoints"),
    Case("fresh-run-over-old-checkpoints", lambda ws: checkpointed_then(ws),
         ("holds checkpoints of an earlier run", "(--resume)")),
]  # fmt: skip


def test_the_corpus_has_at_least_25_distinct_cases() -> None:
    assert len(CASES) >= 25 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(
    case: Case,
    assets: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ws = Workspace(tmp_path, assets, monkeypatch)
    argv = case.build(ws)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse rejects an option value itself
        code = int(stop.code or 0)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert code == case.exit_code, captured.err
    if case.exit_code == 0:
        for text in case.expect:
            assert text in captured.out
    else:
        message = captured.err.strip().splitlines()[-1]
        assert message.startswith(f"lofit {argv[0]}: error:"), captured.err
        assert "internal error" not in message
        for text in case.expect:
            assert text in message, message
    assert_no_partial_outputs(tmp_path, ws.out, case.damaged)
    if argv[0] == "train" and code != 0:
        assert not (ws.out / "adapter").exists()


def assert_no_partial_outputs(root: Path, out: Path, damaged: str | None = None) -> None:
    """No temporary file or directory anywhere, and every file written to `out` is complete."""
    for path in root.rglob("*"):
        assert not (path.name.startswith(".") and ".tmp" in path.name), f"temporary left behind: {path}"
    for path in out.rglob("*") if out.exists() else []:
        if not path.is_file() or (damaged is not None and damaged in path.parts):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_cli_run_resumes_to_the_same_adapter(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lofit train --checkpoint-every 1` stopped by Ctrl-C mid-epoch, then rerun with --resume, writes
    the adapter an uninterrupted run writes."""
    import lofit.training.loop

    ws = Workspace(tmp_path / "uninterrupted", assets, monkeypatch)
    assert main(ws.train("--epochs", "2")) == 0
    expected = load_file(str(ws.out / "adapter" / "lofit_model.safetensors"))

    ws = Workspace(tmp_path / "interrupted", assets, monkeypatch)
    save = lofit.training.loop.save_checkpoint

    def ctrl_c_after_step_2(root, position, **rest):  # type: ignore[no-untyped-def]
        path = save(root, position, **rest)
        if position.step == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(lofit.training.loop, "save_checkpoint", ctrl_c_after_step_2)
    assert main(ws.train("--epochs", "2", "--checkpoint-every", "1")) == 130
    assert not (ws.out / "adapter").exists()
    monkeypatch.setattr(lofit.training.loop, "save_checkpoint", save)
    assert main(ws.train("--epochs", "2", "--checkpoint-every", "1", "--resume")) == 0
    resumed = load_file(str(ws.out / "adapter" / "lofit_model.safetensors"))
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
