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
from ..io.output_paths import describe_not_regular
from .config import LofitConfig, LofitConfigError

CONFIG_NAME = "lofit_config.json"
WEIGHTS_NAME = "lofit_model.safetensors"
FORMAT_NAME = "lofit-adapter"
FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 16 << 20  # a config holds a few hundred head indices; anything larger is not one


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
    if not config_path.exists() and not config_path.is_symlink():
        recover(path)  # a replacement of this folder killed half way leaves a backup to restore
    check_regular_file(config_path)
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterLoadError(
            f"{config_path} is {config_path.stat().st_size:,} bytes, not an adapter config (a few KB); "
            "pass the directory written by save_pretrained"
        )
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterLoadError(f"{config_path}: not valid JSON ({error}); the file is corrupt") from None
    except ValueError:  # an integer of more than 4,300 digits
        raise AdapterLoadError(
            f"{config_path}: holds a number too long to read; the file is corrupt"
        ) from None
    except RecursionError:
        raise AdapterLoadError(f"{config_path}: the JSON is nested too deeply; the file is corrupt") from None
    if not isinstance(document, dict) or document.get("format") != format_name:
        raise AdapterLoadError(f'{config_path}: not a {label} config (missing "format": "{format_name}")')
    version = document.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= format_version:
        shown = (
            repr(version)[:20] if not isinstance(version, int) or abs(version) < 10**9 else "(a huge number)"
        )
        raise AdapterLoadError(
            f"{config_path}: format_version {shown} is not supported by lofit {__version__} "
            f"(supports 1 to {format_version}); "
            + (
                "upgrade lofit"
                if isinstance(version, int) and version > format_version
                else "save the adapter again"
            )
        )
    return document


def check_regular_file(path: Path) -> None:
    """Refuse a path that is missing (FileNotFoundError), or not a regular file (AdapterLoadError).

    A directory, a FIFO or a device (a link to /dev/zero) is named as what it is; reading one could
    block or never end.
    """
    if "\x00" in str(path):
        raise AdapterLoadError(f"{str(path)!r} holds a NUL byte; pass the adapter directory's real path")
    problem = describe_not_regular(path)
    if problem == "does not exist":
        raise FileNotFoundError(f"{path} not found; pass the directory written by save_pretrained")
    if problem is not None:
        raise AdapterLoadError(f"{path} {problem}; pass the directory written by save_pretrained")


def read_tensors(path: str | os.PathLike[str], weights_name: str) -> dict[str, torch.Tensor]:
    """Read the safetensors file; refuse corrupt files and non-finite values."""
    weights_path = Path(path) / weights_name
    check_regular_file(weights_path)
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
    path: str | os.PathLike[str],
    config: LofitConfig,
    head_dim: int,
    compute_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Read `lofit_model.safetensors` and check it tensor by tensor against `config`.

    Every tensor must be one the config names (`layers.L.heads`, and `layers.L.scale` / `layers.L.offset`
    for the vectors it learns); head indices are integers equal to the config's; vectors are floating
    point, of shape [heads, head_dim], and finite once cast to `compute_dtype` (the dtype the model runs
    in: 1e300 stored as float64 is finite there, but inf in float32).

    Args:
        path: the adapter directory.
        config: its (already validated) config.
        head_dim: the base model's head width.
        compute_dtype: the dtype the vectors are applied in.

    Returns:
        The tensors, by name.

    Raises:
        AdapterLoadError: naming the file, the tensor and what is wrong.
    """
    weights_path = Path(path) / WEIGHTS_NAME
    tensors = read_tensors(path, WEIGHTS_NAME)
    assert config.heads is not None
    expected = set()
    for layer, heads in config.heads.items():
        key = f"layers.{layer}.heads"
        expected.add(key)
        stored_heads = tensors.get(key)
        if stored_heads is None:
            raise AdapterLoadError(f"{weights_path}: tensor {key!r} is missing")
        if stored_heads.is_floating_point() or stored_heads.is_complex() or stored_heads.dtype == torch.bool:
            raise AdapterLoadError(
                f"{weights_path}: tensor {key!r} is {stored_heads.dtype}; head indices are integers"
            )
        if stored_heads.dim() != 1 or stored_heads.tolist() != heads:
            raise AdapterLoadError(
                f"{weights_path}: head indices of layer {layer} do not match {CONFIG_NAME}"
            )
        for kind, used in (("scale", config.use_scale), ("offset", config.use_offset)):
            key = f"layers.{layer}.{kind}"
            if not used:
                continue
            expected.add(key)
            value = tensors.get(key)
            if value is None:
                raise AdapterLoadError(f"{weights_path}: tensor {key!r} is missing")
            _check_vector(weights_path, key, value, (len(heads), head_dim), compute_dtype)
    unnamed = sorted(set(tensors) - expected)
    if unnamed:
        shown = ", ".join(repr(name[:60]) for name in unnamed[:5]) + (" ..." if len(unnamed) > 5 else "")
        raise AdapterLoadError(
            f"{weights_path}: holds {len(unnamed)} tensor(s) that {CONFIG_NAME} does not name ({shown}); "
            "the two files do not belong together. Save the adapter again"
        )
    return tensors


def _check_vector(
    weights_path: Path, key: str, value: torch.Tensor, shape: tuple[int, int], compute_dtype: torch.dtype
) -> None:
    if not value.is_floating_point():
        raise AdapterLoadError(
            f"{weights_path}: tensor {key!r} is {value.dtype}; LoFiT vectors are floating point (float32)"
        )
    if tuple(value.shape) != shape:
        raise AdapterLoadError(
            f"{weights_path}: tensor {key!r} has shape {tuple(value.shape)}, expected {shape}"
        )
    if not torch.isfinite(value.to(compute_dtype)).all():
        raise AdapterLoadError(
            f"{weights_path}: tensor {key!r} holds values too large for {compute_dtype} (largest magnitude "
            f"{value.abs().max().item():.3g}): they become inf when the model applies them. The adapter "
            "is damaged or diverged; train it again"
        )
