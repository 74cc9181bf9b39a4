"""The Hub: adapters and head selections by repo id from a Hub cache built here, push_to_hub with a fake HfApi.

No test touches the network: HF_HUB_OFFLINE is on and HF_HUB_CACHE points into tmp_path.
"""

from __future__ import annotations

import doctest
import shutil
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import lofit
from lofit.adapters.hub import HubError, model_card
from lofit.errors import LofitError
from tiny_models import tiny_model, tiny_tokenizer

HEADS = {0: [1], 2: [0, 3]}
IDS = torch.tensor([[5, 9, 17, 33, 2]])


def trained(seed: int, heads=HEADS):  # type: ignore[no-untyped-def]
    """A LofitModel on the seed-0 tiny llama whose vectors are random (seeded) and clearly non-zero."""
    model = lofit.get_lofit_model(tiny_model("llama", 0), lofit.LofitConfig(heads=heads, use_scale=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def logits(model) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache, offline; huggingface_hub reads both settings at import, so patch its constants too."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def publish(cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> None:
    """Lay `source`'s files out as huggingface_hub caches a download: snapshots/<commit>/..., refs/<name>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


def test_from_pretrained_reads_a_repo_id_from_the_cache_at_a_revision(tmp_path, hub_cache):
    main, tagged = trained(1), trained(2)
    main.save_pretrained(tmp_path / "main")
    tagged.save_pretrained(tmp_path / "tagged")
    publish(hub_cache, "org/adapter", tmp_path / "main", "a" * 40)
    publish(hub_cache, "org/adapter", tmp_path / "tagged", "b" * 40, refs=("v1",))
    loaded = lofit.LofitModel.from_pretrained(tiny_model("llama", 0), "org/adapter")
    assert torch.equal(logits(loaded), logits(main))
    assert loaded.selected_heads() == HEADS
    for revision in ("v1", "b" * 40):
        at_tag = lofit.LofitModel.from_pretrained(tiny_model("llama", 0), "org/adapter", revision=revision)
        assert torch.equal(logits(at_tag), logits(tagged))
    loaded.load_adapter("org/adapter", adapter_name="tagged", revision="v1")
    assert torch.equal(logits(loaded), logits(tagged))


def test_a_local_folder_wins_over_the_hub(tmp_path, hub_cache, monkeypatch):
    on_hub, local = trained(1), trained(3)
    on_hub.save_pretrained(tmp_path / "hub")
    publish(hub_cache, "org/adapter", tmp_path / "hub", "a" * 40)
    work = tmp_path / "work"
    local.save_pretrained(work / "org" / "adapter")
    monkeypatch.chdir(work)
    loaded = lofit.LofitModel.from_pretrained(tiny_model("llama", 0), "org/adapter")
    assert torch.equal(logits(loaded), logits(local))


def test_only_the_adapter_files_are_fetched_with_the_token_and_revision(tmp_path, monkeypatch):
    import huggingface_hub

    trained(1).save_pretrained(tmp_path / "remote")
    calls = []

    def fake_download(repo_id, filename, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((repo_id, filename, kwargs["revision"], kwargs["token"]))
        return str(tmp_path / "remote" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    lofit.LofitModel.from_pretrained(tiny_model("llama", 0), "org/private", revision="dev", token="hf_x")
    assert calls == [
        ("org/private", "lofit_config.json", "dev", "hf_x"),
        ("org/private", "lofit_model.safetensors", "dev", "hf_x"),
    ]


def test_head_selection_loads_from_a_repo_id_and_a_folder(tmp_path, hub_cache):
    selection = lofit.HeadSelection(
        torch.tensor([[0.1, 0.9], [0.5, 0.2]]), [(0, 1), (1, 0), (1, 1), (0, 0)], "lofit"
    )
    (tmp_path / "run").mkdir()
    selection.save(tmp_path / "run" / "heads.json")
    publish(hub_cache, "org/heads", tmp_path / "run", "c" * 40)
    for source in ("org/heads", tmp_path / "run"):
        loaded = lofit.HeadSelection.load(source)
        assert loaded.ranking == selection.ranking and torch.equal(loaded.scores, selection.scores)


def test_an_id_neither_local_nor_cached_offline_is_a_clear_error(hub_cache):
    with pytest.raises(HubError, match=r"HF_HUB_OFFLINE.*Pass a local folder"):
        lofit.LofitModel.from_pretrained(tiny_model("llama", 0), "org/missing")
    with pytest.raises(LofitError, match=r"heads\.json"):
        lofit.HeadSelection.load("org/missing")
    with pytest.raises(FileNotFoundError):  # a path that is not repo-shaped keeps the local message
        lofit.LofitModel.from_pretrained(tiny_model("llama", 0), "./no/such/adapter")


def test_cli_exits_2_for_an_uncached_repo_id_offline(tmp_path, hub_cache, capsys):
    from lofit.cli.main import main

    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    code = main(
        ["merge", "--model", str(model_dir), "--adapter", "org/missing", "--out", str(tmp_path / "m")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "HF_HUB_OFFLINE" in err and "Traceback" not in err


class FakeApi:
    """Records what push_to_hub asks of `huggingface_hub.HfApi`, keeping a copy of the uploaded folder."""

    instances: ClassVar[list[FakeApi]] = []
    keep: ClassVar[Path] = Path()

    def __init__(self, token=None):  # type: ignore[no-untyped-def]
        self.token, self.calls = token, []
        FakeApi.instances.append(self)

    def create_repo(self, repo_id, **kwargs):  # type: ignore[no-untyped-def]
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):  # type: ignore[no-untyped-def]
        self.calls.append(("upload_folder", repo_id, kwargs))
        self.uploaded = Path(FakeApi.keep) / repo_id.replace("/", "--")
        shutil.copytree(folder_path, self.uploaded)
        return "commit-info"


def test_push_to_hub_uploads_the_adapter_and_a_model_card(tmp_path, monkeypatch):
    import huggingface_hub

    FakeApi.instances, FakeApi.keep = [], tmp_path
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = trained(1)
    model.config._name_or_path = "org/base-model"
    metrics = {"base": {"mc1": 0.25}, "lofit": {"mc1": 0.5}, "trainable_params": 48}
    result = model.push_to_hub("me/lofit-adapter", private=True, token="hf_x", metrics=metrics)
    api = FakeApi.instances[0]
    assert result == "commit-info" and api.token == "hf_x"
    assert api.calls[0] == ("create_repo", "me/lofit-adapter", {"private": True, "exist_ok": True})
    assert api.calls[1][2]["commit_message"] == "Upload LoFiT adapter"
    assert sorted(p.name for p in api.uploaded.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "lofit_config.json",
        "lofit_model.safetensors",
    ]
    card = (api.uploaded / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: lofit\nbase_model: org/base-model\ntags:\n- lofit\n")
    assert "3 attention heads (48 trainable parameters)" in card  # 3 heads x (scale + offset) x 8
    assert "| 2 | [0, 3] |" in card and "| lofit / mc1 | 0.5 |" in card
    assert 'lofit.LofitModel.from_pretrained(base, "me/lofit-adapter")' in card
    reloaded = lofit.LofitModel.from_pretrained(tiny_model("llama", 0), api.uploaded)
    assert torch.equal(logits(reloaded), logits(model))


def test_model_card_without_a_hub_base_omits_base_model():
    card = model_card(trained(1), "me/x")
    assert "base_model:" not in card and "built in memory" in card and "## Metrics" not in card


def test_hub_doctest_runs():
    import lofit.adapters.hub

    failures, tried = doctest.testmod(lofit.adapters.hub)
    assert tried > 0 and failures == 0
