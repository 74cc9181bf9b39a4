"""Data directory search order and `download_data` (network replaced by a fake fetch function)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lofit.tasks import DataError, DownloadError, download_data, load_task, resolve_data_dir
from lofit.tasks import datadir as datadir_module
from lofit.tasks import download as download_module
from lofit.tasks.download import SOURCES, RemoteFile, git_blob_id
from lofit.tasks.llm_adapters import SPLIT_FILES
from lofit.tasks.truthfulqa import fold_file


def _root_with(base: Path, *benchmarks: str) -> Path:
    for name in benchmarks:
        (base / name).mkdir(parents=True, exist_ok=True)
    return base


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.delenv("LOFIT_DATA_DIR", raising=False)
    monkeypatch.setenv("LOFIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def test_explicit_beats_env_beats_walk_up(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = _root_with(clean_env / "explicit", "mquake")
    env = _root_with(clean_env / "env", "mquake")
    shared = _root_with(clean_env / "repo_parent" / "shared" / "data", "mquake")
    cwd = clean_env / "repo_parent" / "repo" / "sub"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    assert resolve_data_dir(None, "mquake") == shared.resolve()  # ../../shared/data from the cwd
    monkeypatch.setenv("LOFIT_DATA_DIR", str(env))
    assert resolve_data_dir(None, "mquake") == env
    assert resolve_data_dir(explicit, "mquake") == explicit
    assert resolve_data_dir(explicit / "mquake", "mquake") == explicit  # the benchmark folder itself


def test_walk_up_skips_folders_without_the_benchmark(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    near = _root_with(clean_env / "a" / "shared" / "data", "piqa")
    far = _root_with(clean_env / "shared" / "data", "clutrr")
    cwd = clean_env / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    assert resolve_data_dir(None, "piqa") == near.resolve()
    assert resolve_data_dir(None, "clutrr") == far.resolve()


def test_cache_is_the_last_resort(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datadir_module, "shared_data_candidates", lambda cwd=None: [])
    with pytest.raises(DataError) as info:
        resolve_data_dir(None, "winogrande")
    message = str(info.value)
    for hint in (
        "--data-dir",
        "LOFIT_DATA_DIR",
        "`lofit data download winogrande`",
        str(clean_env / "cache" / "data"),
    ):
        assert hint in message
    cached = _root_with(clean_env / "cache" / "data", "winogrande")
    assert resolve_data_dir(None, "winogrande") == cached


def test_explicit_dir_problems(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"missing: the data directory \(--data-dir\) does not exist"):
        resolve_data_dir(clean_env / "missing", "mquake")
    other = _root_with(clean_env / "other", "clutrr")
    with pytest.raises(DataError, match=r"other: the data directory \(--data-dir\) has no 'mquake' folder"):
        resolve_data_dir(other, "mquake")
    monkeypatch.setenv("LOFIT_DATA_DIR", str(other))
    with pytest.raises(DataError, match=r"\(\$LOFIT_DATA_DIR\) has no 'mquake' folder"):
        resolve_data_dir(None, "mquake")


# --- download ---------------------------------------------------------------------------------------


def test_git_blob_id_oracle() -> None:
    # `git hash-object` of an empty file and of "hello\n"
    assert git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_source_table_urls_and_layout() -> None:
    pinned = re.compile(r"^https://raw\.githubusercontent\.com/[\w.-]+/[\w.-]+/[0-9a-f]{40}/\S+$")
    targets = [f.target for files in SOURCES.values() for f in files]
    assert len(targets) == len(set(targets))
    for name, files in SOURCES.items():
        for f in files:
            assert pinned.match(f.url), f.url
            assert f.target.startswith(f"{name}/")
            assert re.fullmatch(r"[0-9a-f]{8}|[0-9a-f]{40}", f.blob)
    # every file a loader opens has a download entry at the path the loader looks for
    have = set(targets)
    for fold in (0, 1):
        for split in ("train", "val", "test"):
            assert str(fold_file(Path("truthfulqa"), fold, split)) in have
    for split in ("train", "val", "test"):
        assert f"mquake/{split}.jsonl" in have and f"clutrr/{split}.json" in have
    for bench, splits in SPLIT_FILES.items():
        for stem in splits.values():
            assert f"{bench}/{stem}.json" in have
    assert "fc2869/lo-fit/ebd344a273d3dab0b63d8bbfd7ecdb5185ae5b7b/dataset/MQuAKE/train.jsonl" in (
        SOURCES["mquake"][0].url
    )


def test_download_writes_checks_and_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b'{"a": 1}\n'
    table = {
        "toy": (RemoteFile("toy/file.jsonl", "https://example.invalid/file.jsonl", git_blob_id(payload)[:8]),)
    }
    monkeypatch.setattr(download_module, "SOURCES", table)
    calls: list[str] = []

    def fetch(url: str) -> bytes:
        calls.append(url)
        return payload

    root = download_data(["toy"], tmp_path, fetch=fetch)
    assert root == tmp_path / "data"
    assert (root / "toy" / "file.jsonl").read_bytes() == payload
    assert "https://example.invalid/file.jsonl" in (root / "toy" / "SOURCE.md").read_text()
    download_data(["toy"], tmp_path, fetch=fetch)
    assert calls == ["https://example.invalid/file.jsonl"]  # present and matching: not fetched again
    download_data(["toy"], tmp_path, fetch=fetch, force=True)
    assert len(calls) == 2

    (root / "toy" / "file.jsonl").unlink()
    with pytest.raises(
        DownloadError, match=r"example\.invalid/file\.jsonl: the downloaded file has git blob"
    ):
        download_data(["toy"], tmp_path, fetch=lambda url: b"tampered")
    assert not (root / "toy" / "file.jsonl").exists()
    assert not [p for p in (root / "toy").iterdir() if p.name.endswith(".tmp")]

    def offline(url: str) -> bytes:
        raise OSError("network is unreachable")

    with pytest.raises(
        DownloadError, match=r"download failed \(OSError: network is unreachable\).*copy the file by"
    ):
        download_data(["toy"], tmp_path, fetch=offline)
    with pytest.raises(DataError, match=r"no download source for nope"):
        download_data(["nope"], tmp_path, fetch=fetch)


def test_download_of_real_table_loads_like_shared_data(tmp_path: Path) -> None:
    try:
        shared = resolve_data_dir(None, "mquake")
    except DataError:
        pytest.skip("benchmark data not found (../shared/data); needed to stand in for the network")
    # ../shared/data holds byte-identical copies of these files, so they can play the remote side.
    by_url = {f.url: shared / f.target for name in ("mquake", "truthfulqa") for f in SOURCES[name]}

    def fetch(url: str) -> bytes:
        return by_url[url].read_bytes()

    root = download_data(["mquake", "truthfulqa"], tmp_path, fetch=fetch)
    assert load_task("mquake", root).test == load_task("mquake", shared).test
    downloaded = load_task("truthfulqa", root, fold=1)
    assert downloaded.train == load_task("truthfulqa", shared, fold=1).train and len(downloaded.test) == 408
