"""`download_data`: fetch the benchmark files from their public sources into lofit's cache.

Every file comes from the exact repository and commit named in ../shared/data/*/SOURCE.md, as a raw
GitHub URL (no Hugging Face hub copy holds LoFiT's splits or the LLM-Adapters renderings, so the hub is
not used). Each download is checked against its git blob id (the full id where ../shared/data holds a
byte-identical copy, else the 8-hex prefix recorded in SOURCE.md) and written atomically; files already
present and matching are skipped. The layout mirrors ../shared/data, except that CLUTRR and the
LLM-Adapters files keep their original `.json` (JSON array) form, which the loaders read as well.
"""

from __future__ import annotations

import hashlib
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..io.atomic import atomic_write_text, atomic_write_with
from .datadir import cache_dir as default_cache_dir

LOFIT = "https://raw.githubusercontent.com/fc2869/lo-fit/ebd344a273d3dab0b63d8bbfd7ecdb5185ae5b7b"
LLM_ADAPTERS = (
    "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/816657208af4db747803f87ba40a4c71383fed7a"
)
TRUTHFULQA = "https://raw.githubusercontent.com/sylinrl/TruthfulQA/fdd8ad1c0d00a478cf8b0bb41a3ad8378c16293b"
MQUAKE = "https://raw.githubusercontent.com/princeton-nlp/MQuAKE/fb43dadc2d8cd19d08ce81c63d957b59deb3f3cd"
CLUTRR = "https://raw.githubusercontent.com/facebookresearch/clutrr/d045fae289d3746503677ceed7631c999202501e"
_LOFIT_LICENSE = "5bcfeeb7402bc978498fe1743555ece4bd77b187"


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: where it goes (relative to the data root), its URL and its git blob id."""

    target: str
    url: str
    blob: str  # full 40-hex id or a prefix of it


def _fold_files() -> tuple[RemoteFile, ...]:
    blobs = {
        (0, "train"): "6f664882fc43fa001342dea10fa6086cc2668906",
        (0, "val"): "26eacc29fa0faa3d0eb86949b5c9df204ecc6efd",
        (0, "test"): "8c0a6fe40e64a8bb80dd8543441d658452c6bfb4",
        (1, "train"): "ae1bd26fbe39be19f70dccec95d40ff5f5c1ac07",
        (1, "val"): "527b3059a903d4b93d5e22f63895618737f0a7ab",
        (1, "test"): "785de2cf23e686b0e95f1c0e4aa5bc3688875dad",
    }
    return tuple(
        RemoteFile(
            f"truthfulqa/lofit_splits/fold_{fold}_{split}_seed_42.csv",
            f"{LOFIT}/dataset/truthfulqa/fold_{fold}_{split}_seed_42.csv",
            blob,
        )
        for (fold, split), blob in blobs.items()
    )


SOURCES: dict[str, tuple[RemoteFile, ...]] = {
    "truthfulqa": (
        *_fold_files(),
        RemoteFile("truthfulqa/lofit_splits/LICENSE.lofit", f"{LOFIT}/LICENSE", _LOFIT_LICENSE),
        RemoteFile("truthfulqa/LICENSE", f"{TRUTHFULQA}/LICENSE", "261eeb9e9f8b2b4b0d119366dda99c6fd7d35c64"),
    ),
    "mquake": (
        RemoteFile(
            "mquake/train.jsonl",
            f"{LOFIT}/dataset/MQuAKE/train.jsonl",
            "434223ae644db9a21dbfeec7224e0e38d1451d68",
        ),
        RemoteFile(
            "mquake/val.jsonl",
            f"{LOFIT}/dataset/MQuAKE/val.jsonl",
            "0f04f67d4bb57582ebdf49bdead38a8580071fda",
        ),
        RemoteFile(
            "mquake/test.jsonl",
            f"{LOFIT}/dataset/MQuAKE/test.jsonl",
            "fafb5d6088c8eafb86d0eb1882c5d6a61e862a1f",
        ),
        RemoteFile("mquake/LICENSE.lofit", f"{LOFIT}/LICENSE", _LOFIT_LICENSE),
        RemoteFile("mquake/LICENSE", f"{MQUAKE}/LICENSE", "3bf435ec0493e58e4c7d2da5f0303a72f6dd00e6"),
    ),
    "clutrr": (
        RemoteFile("clutrr/train.json", f"{LOFIT}/dataset/clutrr/train.json", "2b5bbbda"),
        RemoteFile("clutrr/val.json", f"{LOFIT}/dataset/clutrr/val.json", "2855b4b5"),
        RemoteFile("clutrr/test.json", f"{LOFIT}/dataset/clutrr/test.json", "0115e0c4"),
        RemoteFile("clutrr/LICENSE.lofit", f"{LOFIT}/LICENSE", _LOFIT_LICENSE),
        RemoteFile("clutrr/LICENSE", f"{CLUTRR}/LICENSE", "50f2e656c8e006d68fce3c9ddd02d9069072214a"),
    ),
    "arc_easy": (
        RemoteFile(
            "arc_easy/llm_adapters_train.json", f"{LLM_ADAPTERS}/dataset/ARC-Easy/train.json", "488a8e5e"
        ),
        RemoteFile(
            "arc_easy/llm_adapters_test.json", f"{LLM_ADAPTERS}/dataset/ARC-Easy/test.json", "6c0d30aa"
        ),
    ),
    "openbookqa": (
        RemoteFile(
            "openbookqa/llm_adapters_train.json", f"{LLM_ADAPTERS}/dataset/openbookqa/train.json", "75bcd5eb"
        ),
        RemoteFile(
            "openbookqa/llm_adapters_test.json", f"{LLM_ADAPTERS}/dataset/openbookqa/test.json", "a6e69676"
        ),
    ),
    "piqa": (
        RemoteFile("piqa/llm_adapters_test.json", f"{LLM_ADAPTERS}/dataset/piqa/test.json", "f7a1c260"),
    ),
    "arc_challenge": (
        RemoteFile(
            "arc_challenge/llm_adapters_train.json",
            f"{LLM_ADAPTERS}/dataset/ARC-Challenge/train.json",
            "d7e080b04bff9fd16dd85455fb04481807a088d8",
        ),
        RemoteFile(
            "arc_challenge/llm_adapters_test.json",
            f"{LLM_ADAPTERS}/dataset/ARC-Challenge/test.json",
            "9540685439144200b5a7e48dab9ca4655be2af09",
        ),
    ),
    "siqa": (
        RemoteFile(
            "siqa/llm_adapters_test.json",
            f"{LLM_ADAPTERS}/dataset/social_i_qa/test.json",
            "eadf221799ca394367b144c0f86ee0436db409d2",
        ),
    ),
    "boolq": (
        RemoteFile(
            "boolq/llm_adapters_train.json",
            f"{LLM_ADAPTERS}/dataset/boolq/train.json",
            "87a7beee26b49f81c450641ef2ff84f55611321f",
        ),
        RemoteFile(
            "boolq/llm_adapters_test.json",
            f"{LLM_ADAPTERS}/dataset/boolq/test.json",
            "6d7edb0a8e8a6566b546ccf0d98d24e48db3fdf3",
        ),
    ),
    "svamp": (
        RemoteFile(
            "svamp/svamp.json",
            f"{LLM_ADAPTERS}/dataset/SVAMP/SVAMP.json",
            "e2b2f9e8db9f9c002d2bff2cb450a4abb40fa61b",
        ),
    ),
    "winogrande": (
        RemoteFile(
            "winogrande/llm_adapters_test.json", f"{LLM_ADAPTERS}/dataset/winogrande/test.json", "21257263"
        ),
    ),
}

Fetch = Callable[[str], bytes]


class DownloadError(DataError):
    """A file could not be fetched or did not match its recorded checksum."""


def git_blob_id(data: bytes) -> str:
    """The id git gives `data` as a blob: sha1 of "blob <size>\\0" + data."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fetch_url(url: str, timeout: float = 60.0) -> bytes:
    """Plain HTTPS GET (the default fetch function)."""
    request = urllib.request.Request(url, headers={"User-Agent": "lofit-data-download"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data: bytes = response.read()
    return data


def download_data(
    names: Iterable[str] | None = None,
    cache_dir: str | Path | None = None,
    *,
    fetch: Fetch | None = None,
    force: bool = False,
) -> Path:
    """Fetch benchmark files from their public sources into `<cache_dir>/data` (checked, atomic).

    Args:
        names: benchmarks to fetch (default: all of `SOURCES`).
        cache_dir: the cache root (default $LOFIT_CACHE_DIR or ~/.cache/lofit, where the loaders look last).
        fetch: url -> bytes, replacing the network call (e.g. in tests).
        force: download again even where a matching file is present.

    Returns:
        The data folder written.
    """
    wanted = list(SOURCES) if names is None else list(names)
    unknown = [n for n in wanted if n not in SOURCES]
    if unknown:
        raise DataError(
            None,
            None,
            None,
            f"no download source for {', '.join(unknown)}",
            f"choose from {', '.join(SOURCES)}",
        )
    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "data"
    get = fetch or fetch_url
    for name in wanted:
        for remote in SOURCES[name]:
            _fetch_one(remote, root, get, force)
        _write_provenance(root / name, SOURCES[name])
    return root


def _fetch_one(remote: RemoteFile, root: Path, fetch: Fetch, force: bool) -> None:
    target = root / remote.target
    if not force and target.is_file() and git_blob_id(target.read_bytes()).startswith(remote.blob):
        return
    try:
        data = fetch(remote.url)
    except Exception as exc:  # any transport failure ends as one actionable message
        raise DownloadError(
            remote.url,
            None,
            None,
            f"download failed ({type(exc).__name__}: {exc})",
            f"check the internet connection, or copy the file by hand to {target}",
        ) from exc
    blob = git_blob_id(data)
    if not blob.startswith(remote.blob):
        raise DownloadError(
            remote.url,
            None,
            None,
            f"the downloaded file has git blob {blob[:12]}, expected {remote.blob[:12]}",
            "retry; if it persists the upstream file changed and lofit's source table needs updating",
        )

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    atomic_write_with(target, write)


def _write_provenance(folder: Path, files: tuple[RemoteFile, ...]) -> None:
    lines = ["# Downloaded by `lofit data download`", ""]
    lines += [f"- `{Path(f.target).relative_to(folder.name)}` <- {f.url} (git blob {f.blob})" for f in files]
    atomic_write_text(folder / "SOURCE.md", "\n".join(lines) + "\n")
