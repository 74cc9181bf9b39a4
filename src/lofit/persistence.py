"""Save and load adapters: `lofit_config.json` + `lofit_model.safetensors`, never pickle.

The config records the head geometry and an identity of the base model (type, sizes and a fingerprint
of the adapted projection weights), so an adapter is never silently applied to another model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._version import __version__
from .atomic import atomic_directory, recover
from .config import LofitConfig, LofitConfigError
from .errors import AdapterLoadError
from .errors import BaseModelMismatchError as BaseModelMismatchError  # re-exported: the old home
from .fingerprint import base_model_identity, check_same_base
from .heads import HeadGeometry, find_output_projections

if TYPE_CHECKING:
    from .model import LofitModel

CONFIG_NAME = "lofit_config.json"
WEIGHTS_NAME = "lofit_model.safetensors"
FORMAT_NAME = "lofit-adapter"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------- save
def save_adapter(model: LofitModel, path: str | os.PathLike[str], adapter_name: str) -> None:
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory; choose another output path")
    config = model.lofit_config[adapter_name]
    tensors: dict[str, torch.Tensor] = {}
    heads: dict[str, list[int]] = {}
    for layer, vectors in model.adapter_vectors(adapter_name).items():
        heads[str(layer)] = vectors.heads.tolist()
        tensors[f"layers.{layer}.heads"] = vectors.heads.detach().cpu().contiguous()
        for kind in ("scale", "offset"):
            param = getattr(vectors, kind)
            if param is not None:
                values = param.detach().float().cpu().contiguous()
                if not torch.isfinite(values).all():
                    raise ValueError(
                        f"adapter {adapter_name!r} layer {layer} {kind} holds NaN/inf; refusing to save"
                    )
                tensors[f"layers.{layer}.{kind}"] = values
    adapter = config.to_dict()
    adapter["heads"] = heads
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lofit_version": __version__,
        "adapter": adapter,
        "base_model": base_model_identity(model.base_model, model.geometry),
    }
    # Both files appear together (a new directory is renamed into place), or, over an existing adapter,
    # each is replaced atomically: a crash or a full disk never leaves a partial file.
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------- load
def read_adapter_config(path: str | os.PathLike[str]) -> tuple[LofitConfig, dict[str, Any]]:
    """Parse and validate `lofit_config.json`; returns the adapter config and the base-model identity."""
    config_path = Path(path) / CONFIG_NAME
    if not config_path.is_file():
        recover(path)  # a replacement of this folder killed half way leaves a backup to restore
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; pass the directory written by save_pretrained")
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterLoadError(f"{config_path}: not valid JSON ({error}); the file is corrupt") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise AdapterLoadError(
            f'{config_path}: not a LoFiT adapter config (missing "format": "{FORMAT_NAME}")'
        )
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterLoadError(
            f"{config_path}: format_version {version!r} is not supported by lofit {__version__} "
            f"(supports <= {FORMAT_VERSION}); upgrade lofit"
        )
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
    weights_path = Path(path) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found; pass the directory written by save_pretrained")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterLoadError(
            f"{weights_path}: cannot read safetensors ({error}); the file is corrupt or truncated"
        ) from None
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
            if not torch.isfinite(value).all():
                raise AdapterLoadError(f"{weights_path}: tensor {key!r} holds NaN or inf values")
    return tensors


def _read_checked(
    base_model: nn.Module, path: str | os.PathLike[str], geometry: HeadGeometry | None
) -> tuple[LofitConfig, dict[str, torch.Tensor]]:
    config, saved_identity = read_adapter_config(path)
    geometry = geometry or find_output_projections(base_model, config.target_modules)
    check_same_base(saved_identity, base_model_identity(base_model, geometry), Path(path) / CONFIG_NAME)
    tensors = read_adapter_tensors(path, config, geometry.head_dim)
    return LofitConfig(**{**config.__dict__, "init_std": 0.0}), tensors


def _copy_tensors(
    model: LofitModel, adapter_name: str, tensors: dict[str, torch.Tensor], trainable: bool
) -> None:
    with torch.no_grad():
        for layer, vectors in model.adapter_vectors(adapter_name).items():
            for kind in ("scale", "offset"):
                param = getattr(vectors, kind)
                if param is not None:
                    param.copy_(tensors[f"layers.{layer}.{kind}"].to(param))
    for param in model.adapter_parameters(adapter_name):
        param.requires_grad_(trainable)


def load_lofit_model(
    base_model: nn.Module, path: str | os.PathLike[str], adapter_name: str, is_trainable: bool
) -> LofitModel:
    from .model import LofitModel

    if isinstance(base_model, LofitModel):
        raise TypeError(
            "base_model is already a LofitModel; use model.load_adapter(path, adapter_name) instead"
        )
    config, tensors = _read_checked(base_model, path, None)  # before touching the base model
    model = LofitModel(base_model, config, adapter_name)
    for param in model.base_model.parameters():
        param.requires_grad_(False)
    _copy_tensors(model, adapter_name, tensors, is_trainable)
    return model


def load_adapter_into(
    model: LofitModel, path: str | os.PathLike[str], adapter_name: str, is_trainable: bool
) -> None:
    config, tensors = _read_checked(model.base_model, path, model.geometry)
    model.add_adapter(adapter_name, config)
    _copy_tensors(model, adapter_name, tensors, is_trainable)
    model.set_adapter(adapter_name)
