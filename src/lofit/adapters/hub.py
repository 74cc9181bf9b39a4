"""The Hugging Face Hub: adapters and head selections by repo id, `push_to_hub`, the model card.

Resolution follows transformers' rule: a local path wins; otherwise a string shaped like a repo id
("org/name") is fetched through `huggingface_hub` — only the files lofit reads, into its cache, honouring
`HF_HUB_OFFLINE`, `HF_HUB_CACHE`/`HF_HOME`, `HF_TOKEN` and a `revision` (branch, tag or commit). Anything that
cannot be found becomes a `HubError` (a `LofitError`: exit code 2 on the command line) that says what to
change.

Example:
    >>> from lofit.adapters.hub import looks_like_repo_id
    >>> looks_like_repo_id("org/name"), looks_like_repo_id("runs/out/adapter"), looks_like_repo_id("./adapter")
    (True, False, False)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, cast

from torch import nn

from .. import __version__
from ..errors import LofitValueError
from ..io.output_paths import REPO_ID
from .config import HeadMap, LofitConfig
from .persistence import CONFIG_NAME, WEIGHTS_NAME

SELECTION_FILENAME = "heads.json"  # what `lofit select` / `lofit run` write
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)


class AdapterSource(Protocol):
    """What pushing and describing an adapter needs of a `LofitModel` (this module does not import it)."""

    @property
    def active_adapter(self) -> str: ...

    @property
    def lofit_config(self) -> Mapping[str, LofitConfig]: ...

    def selected_heads(self, adapter_name: str | None = None) -> HeadMap: ...

    def adapter_parameters(
        self, adapter_name: str | None = None, kind: str | None = None
    ) -> list[nn.Parameter]: ...

    def save_pretrained(self, path: str | os.PathLike[str], adapter_name: str | None = None) -> None: ...


class HubError(LofitValueError):
    """A name is neither a local path nor a Hub repo that can be fetched; the message says what to change."""


def looks_like_repo_id(name: str | os.PathLike[str]) -> bool:
    """Whether `name` has the shape of a Hub repo id ("org/name"), as opposed to a longer or explicit path."""
    text = os.fspath(name)
    return bool(REPO_ID.match(text)) and not text.startswith(".") and ".." not in text


def _download(repo_id: str, filename: str, revision: str | None, token: str | bool | None) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token, library_name="lofit"))
    except LocalEntryNotFoundError:
        where = "the Hub cache" + (" (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else "")
        raise HubError(
            f"{repo_id!r} is not a local path, and {filename} of the Hub repo {at} is not in {where} "
            f"({constants.HF_HUB_CACHE}). Pass a local folder written by save_pretrained, or download the repo "
            f"first (unset HF_HUB_OFFLINE, or `hf download {repo_id}`)."
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as error:
        raise HubError(
            f"{repo_id!r} is not a local path, and the Hub repo {at} has no {filename} "
            f"({type(error).__name__}); check the name and revision (and HF_TOKEN for a private repo)"
        ) from None
    except (HfHubHTTPError, HFValidationError, OSError) as error:
        raise HubError(f"cannot fetch {filename} of the Hub repo {at}: {error}") from None


def resolve_adapter_dir(
    name_or_path: str | os.PathLike[str], revision: str | None = None, token: str | bool | None = None
) -> Path:
    """The local folder holding the adapter `name_or_path`: itself if it exists, else its Hub snapshot.

    Args:
        name_or_path: a folder written by `LofitModel.save_pretrained`, or a Hub repo id ("org/name").
        revision: the branch, tag or commit of the Hub repo (ignored for a local folder).
        token: a Hub token; None uses the saved login or `HF_TOKEN`.

    Returns:
        The folder holding `lofit_config.json` and `lofit_model.safetensors` (a local path is returned as is,
        so that the loader's own messages name it).

    Raises:
        HubError: a repo id that cannot be fetched (offline and not cached, unknown, no adapter files).
    """
    if Path(name_or_path).exists() or not looks_like_repo_id(name_or_path):
        return Path(name_or_path)
    repo_id = os.fspath(name_or_path)
    files = [_download(repo_id, name, revision, token) for name in ADAPTER_FILES]
    return files[0].parent


def resolve_selection_file(
    name_or_path: str | os.PathLike[str], revision: str | None = None, token: str | bool | None = None
) -> Path:
    """The local head-selection file: `name_or_path` itself, `heads.json` in a folder, or a Hub repo's.

    Args:
        name_or_path: a file written by `HeadSelection.save`, a folder holding `heads.json`, or a Hub repo id.
        revision: the branch, tag or commit of the Hub repo.
        token: a Hub token; None uses the saved login or `HF_TOKEN`.

    Returns:
        The path of the file to read.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path / SELECTION_FILENAME
    if path.exists() or path.suffix == ".json" or not looks_like_repo_id(name_or_path):
        return path
    return _download(os.fspath(name_or_path), SELECTION_FILENAME, revision, token)


# ------------------------------------------------------------------------------------------ push
def _metrics_table(metrics: Mapping[str, Any]) -> list[str]:
    rows = []
    for name, value in metrics.items():
        if isinstance(value, Mapping):
            rows += [f"| {name} / {key} | {float(inner):.4g} |" for key, inner in value.items()]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            rows.append(f"| {name} | {float(value):.4g} |")
    return ["| metric | value |", "|---|---|", *rows] if rows else []


def model_card(
    model: AdapterSource, repo_id: str, adapter_name: str | None = None, metrics: Any = None
) -> str:
    """A README.md for the adapter: YAML front matter (library_name, base_model, tags) and a usage snippet.

    Args:
        model: the LofitModel whose adapter is described.
        repo_id: the Hub repo the card is for.
        adapter_name: the adapter (default: the active one).
        metrics: optional `{name: value}` or `{setting: {name: value}}` (as `lofit run`'s metrics.json).

    Returns:
        The card's text.
    """
    heads = model.selected_heads(adapter_name)
    config = model.lofit_config[adapter_name or model.active_adapter]
    base_config = cast(Any, model).config  # passes through to the wrapped transformers model
    base_id = str(getattr(base_config, "_name_or_path", "") or "")
    n_params = sum(p.numel() for p in model.adapter_parameters(adapter_name))
    n_heads = sum(len(h) for h in heads.values())
    parts = [("scale A" if config.use_scale else ""), ("offset v" if config.use_offset else "")]
    learned = " and ".join(p for p in parts if p)
    front = ["---", "library_name: lofit"]
    front += [f"base_model: {base_id}"] if looks_like_repo_id(base_id) else []
    front += ["tags:", "- lofit", "- localized-fine-tuning", f"- {base_config.model_type}", "---"]
    base_text = f"`{base_id}`" if base_id else "a base model built in memory (no Hub id recorded)"
    lines = [
        *front, "", f"# {repo_id.split('/')[-1]}", "",
        f"A [LoFiT](https://arxiv.org/abs/2406.01563) adapter for {base_text}: a learned {learned} on "
        f"{n_heads} attention heads ({n_params:,d} trainable parameters), written by lofit {__version__}.",
        "", "| layer | heads |", "|---|---|", *[f"| {layer} | {h} |" for layer, h in sorted(heads.items())],
    ]  # fmt: skip
    table = _metrics_table(metrics or {})
    lines += ["", "## Metrics", "", *table] if table else []
    load = f'AutoModelForCausalLM.from_pretrained("{base_id or "<base model>"}")'
    lines += [
        "", "## Usage", "", "```python", "import lofit", "from transformers import AutoModelForCausalLM", "",
        f"base = {load}", f'model = lofit.LofitModel.from_pretrained(base, "{repo_id}")', "```", "",
    ]  # fmt: skip
    return "\n".join(lines)


def push_adapter(
    model: AdapterSource,
    repo_id: str,
    *,
    adapter_name: str | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    metrics: Any = None,
) -> Any:
    """Upload the adapter files and a generated model card (README.md) to the Hub repo `repo_id`.

    The folder is written with the atomic `save_pretrained` into a temporary directory, then uploaded in
    one commit (`HfApi.upload_folder`); the repo is created if missing.

    Returns:
        What `HfApi.upload_folder` returns (the commit info).
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lofit-push-") as tmp:
        folder = Path(tmp) / "adapter"
        model.save_pretrained(folder, adapter_name)
        (folder / "README.md").write_text(model_card(model, repo_id, adapter_name, metrics), encoding="utf-8")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message or "Upload LoFiT adapter",
            revision=revision,
            create_pr=create_pr,
        )
