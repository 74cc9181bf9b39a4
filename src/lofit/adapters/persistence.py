"""Adapter files: a JSON config and a safetensors file, written atomically, never pickle.

This module only reads and writes files; it knows no model class. The config records the adapter's
settings and an identity of the base model (type, sizes and a fingerprint of the adapted projection
weights, `lofit.adapters.fingerprint`), so that an adapter is never silently applied to another model. LoFiT
writes `lofit_config.json` + `lofit_model.safetensors`; RED uses the same code with its own names.

Example:
    >>> import tempfile, torch
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     write_adapter_files(tmp, {"format": "demo", "format_version": 1}, {"v": torch.ones(2)},
    ...                         "demo_config.json", "demo_model.safetensors")
    ...     document = read_document(tmp, "demo_config.json", "demo", 1)
    ...     tensors = read_tensors(tmp, "demo_model.safetensors")
    >>> document["format"], tensors["v"].tolist()
    ('demo', [1.0, 1.0])
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..errors import AdapterLoadError, LofitValueError
from ..errors import BaseModelMismatchError as BaseModelMismatchError  # re-exported: the old home
from ..io.atomic import atomic_directory, recover
from .config import LofitConfig, LofitConfigError

CONFIG_NAME = "lofit_config.json"
WEIGHTS_NAME = "lofit_model.safetensors"
FORMAT_NAME = "lofit-adapter"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------ generic files
def write_adapter_files(
    path: str | os.PathLike[str],
    document: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    config_name: str,
    weights_name: str,
) -> None:
    """Write `document` as JSON and `tensors` as safetensors into the directory `path`, atomically.

    Both files appear together (a new directory is renamed into place), or, over an existing adapter,
    each is replaced atomically: a crash or a full disk never leaves a partial file. Non-finite tensors
    are refused before anything is written.
    """
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory; choose another output path")
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise LofitValueError(f"tensor {key!r} holds NaN/inf; refusing to save the adapter")
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / weights_name), metadata={"format": "pt"})
        (tmp / config_name).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def read_document(
    path: str | os.PathLike[str],
    config_name: str,
    format_name: str,
    format_version: int,
    label: str = "lofit adapter",
) -> dict[str, Any]:
    """Read and check the JSON config (its "format" and a supported "format_version")."""
    config_path = Path(path) / config_name
    if not config_path.is_file():
        recover(path)  # a replacement of this folder killed half way leaves a backup to restore
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; pass the directory written by save_pretrained")
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterLoadError(f"{config_path}: not valid JSON ({error}); the file is corrupt") from None
    if not isinstance(document, dict) or document.get("format") != format_name:
        raise AdapterLoadError(f'{config_path}: not a {label} config (missing "format": "{format_name}")')
    version = document.get("format_version")
    if not isinstance(version, int) or version > format_version:
        raise AdapterLoadError(
            f"{config_path}: format_version {version!r} is not supported by lofit {__version__} "
            f"(supports <= {format_version}); upgrade lofit"
        )
    return document


def read_tensors(path: str | os.PathLike[str], weights_name: str) -> dict[str, torch.Tensor]:
    """Read the safetensors file; refuse corrupt files and non-finite values."""
    weights_path = Path(path) / weights_name
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found; pass the directory written by save_pretrained")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterLoadError(
            f"{weights_path}: cannot read safetensors ({error}); the file is corrupt or truncated"
        ) from None
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise AdapterLoadError(f"{weights_path}: tensor {key!r} holds NaN or inf values")
    return tensors


# ------------------------------------------------------------------------------------- LoFiT
def save_adapter(
    path: str | os.PathLike[str],
    config: LofitConfig,
    tensors: dict[str, torch.Tensor],
    base_identity: dict[str, Any],
) -> None:
    """Write a LoFiT adapter: `config` (its heads as stored in `tensors`) and the base identity."""
    adapter = config.to_dict()
    adapter["heads"] = {
        key.split(".")[1]: value.tolist() for key, value in tensors.items() if key.endswith(".heads")
    }
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lofit_version": __version__,
        "adapter": adapter,
        "base_model": base_identity,
    }
    write_adapter_files(path, document, tensors, CONFIG_NAME, WEIGHTS_NAME)


def read_adapter_config(path: str | os.PathLike[str]) -> tuple[LofitConfig, dict[str, Any]]:
    """Parse and validate `lofit_config.json`; returns the adapter config and the base-model identity."""
    config_path = Path(path) / CONFIG_NAME
    document = read_document(path, CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, "LoFiT adapter")
    for key in ("adapter", "base_model"):
        if not isinstance(document.get(key), dict):
            raise AdapterLoadError(f"{config_path}: field {key!r} is missing or not an object")
    try:
        config = LofitConfig.from_dict(document["adapter"])
    except (LofitConfigError, TypeError) as error:
        raise AdapterLoadError(f"{config_path}: field 'adapter' is invalid: {error}") from None
    if not config.heads:
        raise AdapterLoadError(f"{config_path}: field 'adapter.heads' lists no head")
    return config, document["base_model"]


def read_adapter_tensors(
    path: str | os.PathLike[str], config: LofitConfig, head_dim: int
) -> dict[str, torch.Tensor]:
    """Read `lofit_model.safetensors` and check it against `config` (heads, shapes, finiteness)."""
    weights_path = Path(path) / WEIGHTS_NAME
    tensors = read_tensors(path, WEIGHTS_NAME)
    assert config.heads is not None
    for layer, heads in config.heads.items():
        stored_heads = tensors.get(f"layers.{layer}.heads")
        if stored_heads is None or stored_heads.tolist() != heads:
            raise AdapterLoadError(
                f"{weights_path}: head indices of layer {layer} do not match {CONFIG_NAME}"
            )
        for kind, used in (("scale", config.use_scale), ("offset", config.use_offset)):
            key = f"layers.{layer}.{kind}"
            if not used:
                continue
            value = tensors.get(key)
            if value is None:
                raise AdapterLoadError(f"{weights_path}: tensor {key!r} is missing")
            if tuple(value.shape) != (len(heads), head_dim):
                raise AdapterLoadError(
                    f"{weights_path}: tensor {key!r} has shape {tuple(value.shape)}, expected {(len(heads), head_dim)}"
                )
    return tensors
