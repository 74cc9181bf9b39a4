"""Adapter files: a JSON config and a safetensors file, written atomically, never pickle.

This module only reads and writes files; it knows no model class. The config records the adapter's
settings and an identity of the base model (type, sizes, architecture fields and a fingerprint of every
base tensor, `lofit.adapters.fingerprint`), so that an adapter is never silently applied to another model.
LoFiT writes `lofit_config.json` + `lofit_model.safetensors`; RED uses the same code with its own names.

A LoFiT adapter folder is small (27 heads on SmolLM2-135M: 15.1 KB, was 189 KB): format 2 packs the vectors of all
layers into one tensor per kind (`heads` [K, 2] = (layer, head) rows, `offset` / `scale` [K, head_dim]) and
stores the fingerprint in a few bytes per base tensor (`lofit.adapters.fingerprint_store`: names folded
in the JSON, `base_model.sum_sq` and `base_model.codes` in the safetensors file). Format 1 folders (one
tensor per layer and kind, the fingerprint as JSON) are still read.

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
from ..io.atomic import atomic_directory, recover
from ..io.output_paths import describe_not_regular
from .config import LofitConfig, LofitConfigError
from .fingerprint_store import FINGERPRINT_KEYS, pack_identity, unpack_identity

CONFIG_NAME = "lofit_config.json"
WEIGHTS_NAME = "lofit_model.safetensors"
FORMAT_NAME = "lofit-adapter"
FORMAT_VERSION = 2  # 2: vectors packed, fingerprint compact; 1: one tensor per layer, fingerprint as JSON
PACKED_KEYS = ("heads", "scale", "offset")
PEFT_CONFIG_NAME = "adapter_config.json"
# PEFT's loaders (PeftModel / AutoPeftModelForCausalLM.from_pretrained, PeftConfig.from_pretrained,
# transformers' model.load_adapter) read adapter_config.json first and fail on an unknown "peft_type" with a
# KeyError that shows its value: so the value is lofit's advice, and those calls answer in lofit's words.
PEFT_SIGNPOST = (
    json.dumps(
        {
            "peft_type": "LOFIT (this folder is a LoFiT adapter, not a PEFT one: load it with "
            "lofit.LofitModel.from_pretrained(base_model, path); for PEFT, export an offsets-only adapter with "
            "lofit.integrations.peft.export_peft_adapter(model, path))",
            "lofit_adapter": CONFIG_NAME,
        },
        indent=2,
    )
    + "\n"
)
STATE_NAME = "model.safetensors"  # what transformers.Trainer writes for a model it cannot save_pretrained
STATE_CONFIG_KEY = "lofit_config"  # the config document inside `LofitModel.state_dict()` (UTF-8 bytes)
MAX_CONFIG_BYTES = 16 << 20  # a config holds a few hundred head indices; anything larger is not one


# ------------------------------------------------------------------------------ generic files
def write_adapter_files(
    path: str | os.PathLike[str],
    document: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    config_name: str,
    weights_name: str,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write `document` as JSON and `tensors` as safetensors into the directory `path`, atomically.

    `extra_files` (name -> text) are written with them.

    The folder is swapped in whole (`lofit.io.atomic.atomic_directory`, policy "beside"): a crash or a full
    disk never leaves a partial file, and every other file already in `path` (a base model saved there, as
    PEFT allows, or a user's notes) is kept. `path` must not be a symbolic link. Non-finite tensors are
    refused before anything is written.
    """
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory; choose another output path")
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise LofitValueError(f"tensor {key!r} holds NaN/inf; refusing to save the adapter")
    with atomic_directory(directory, policy="beside") as tmp:
        save_file(tensors, str(tmp / weights_name), metadata={"format": "pt"})
        (tmp / config_name).write_text(readable_json(document) + "\n", encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")


def readable_json(value: Any, indent: str = "") -> str:
    """JSON with one object field per line and lists on one line (a list of lists: one item per line).

    Example:
        >>> print(readable_json({"a": {"b": [1, 2]}, "c": [[1], [2]]}))
        {
          "a": {
            "b": [1,2]
          },
          "c": [
            [1],
            [2]
          ]
        }
    """
    inner = indent + "  "
    if isinstance(value, dict) and value:
        fields = [f"{inner}{json.dumps(str(k))}: {readable_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(fields) + f"\n{indent}}}"
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return (
            "[\n" + ",\n".join(inner + json.dumps(v, separators=(",", ":")) for v in value) + f"\n{indent}]"
        )
    return json.dumps(value, separators=(",", ":"))


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
    return check_document(document, config_path, format_name, format_version, label)


def check_document(
    document: Any, config_path: str | os.PathLike[str], format_name: str, format_version: int, label: str
) -> dict[str, Any]:
    """`document` if it is a config of `format_name` in a supported `format_version`, else AdapterLoadError."""
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
def adapter_document(
    config: LofitConfig, tensors: dict[str, torch.Tensor], base_identity: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config document of a LoFiT adapter, and the fingerprint tensors that go with it.

    The document holds `config` (its heads as stored in `tensors`, one tensor per layer) and the base
    identity (`base_model_identity`) with its fingerprint packed (`fingerprint_store.pack_identity`).
    """
    adapter = config.to_dict()
    adapter["heads"] = {
        key.split(".")[1]: value.tolist() for key, value in tensors.items() if key.endswith(".heads")
    }
    stored, fingerprint = pack_identity(base_identity)
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lofit_version": __version__,
        "adapter": adapter,
        "base_model": stored,
    }
    return document, fingerprint


def pack_vectors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One-tensor-per-layer vectors (`layers.L.heads` / `.scale` / `.offset`) as one tensor per kind.

    `heads` is int32 [K, 2] of (layer, head) rows, in layer order as given; `scale` / `offset` are
    [K, head_dim] in the same row order. The layout of format 2; `unpack_vectors` is the inverse.

    Example:
        >>> packed = pack_vectors({"layers.3.heads": torch.tensor([1, 4]), "layers.3.offset": torch.ones(2, 8)})
        >>> packed["heads"].tolist(), packed["offset"].shape
        ([[3, 1], [3, 4]], torch.Size([2, 8]))
    """
    layers = [key.split(".")[1] for key in tensors if key.endswith(".heads")]
    rows = [[int(layer), int(head)] for layer in layers for head in tensors[f"layers.{layer}.heads"].tolist()]
    packed = {"heads": torch.tensor(rows, dtype=torch.int32).reshape(-1, 2)}
    for kind in PACKED_KEYS[1:]:
        parts = [tensors[f"layers.{layer}.{kind}"] for layer in layers if f"layers.{layer}.{kind}" in tensors]
        if parts:
            packed[kind] = torch.cat(parts).contiguous()
    return packed


def unpack_vectors(tensors: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """`tensors` with the packed vectors (`pack_vectors`) split per layer again; other keys kept as they are.

    Raises:
        AdapterLoadError: the packed tensors are malformed (named with `source`).
    """
    if "heads" not in tensors:
        return dict(tensors)  # format 1: one tensor per layer
    heads = tensors["heads"]
    if (
        heads.is_floating_point()
        or heads.is_complex()
        or heads.dtype == torch.bool
        or heads.dim() != 2
        or (heads.shape[1] != 2)
    ):
        raise AdapterLoadError(f"{source}: tensor 'heads' must be integer (layer, head) rows [K, 2], got "
                               f"{heads.dtype} {tuple(heads.shape)}")  # fmt: skip
    out = {key: value for key, value in tensors.items() if key not in PACKED_KEYS}
    pairs = heads.long()
    for kind in PACKED_KEYS[1:]:
        value = tensors.get(kind)
        if value is not None and (value.dim() < 1 or value.shape[0] != pairs.shape[0]):
            raise AdapterLoadError(
                f"{source}: tensor {kind!r} has shape {tuple(value.shape)}; it needs one row per row of "
                f"'heads' ({pairs.shape[0]})"
            )
    for layer in dict.fromkeys(pairs[:, 0].tolist()):
        rows = (pairs[:, 0] == layer).nonzero().squeeze(1)
        parts = {"heads": pairs[rows, 1]}
        parts.update({kind: tensors[kind][rows] for kind in PACKED_KEYS[1:] if kind in tensors})
        for kind, value in parts.items():
            key = f"layers.{layer}.{kind}"
            if key in out:
                raise AdapterLoadError(
                    f"{source}: holds both the packed tensor {kind!r} and {key!r}; save again"
                )
            out[key] = value
    return out


def save_adapter(
    path: str | os.PathLike[str],
    config: LofitConfig,
    tensors: dict[str, torch.Tensor],
    base_identity: dict[str, Any],
) -> None:
    """Write a LoFiT adapter: `config` (its heads as stored in `tensors`), the base identity, PEFT's signpost.

    The signpost is left out where it would harm what the folder already holds: a model (its `config.json`:
    transformers would then read the folder as a PEFT adapter and no longer load the model) or a PEFT
    adapter's own `adapter_config.json` (never replaced).
    """
    document, fingerprint = adapter_document(config, tensors, base_identity)
    extra = {PEFT_CONFIG_NAME: PEFT_SIGNPOST} if _signpost_fits(Path(path)) else {}
    write_adapter_files(
        path, document, {**pack_vectors(tensors), **fingerprint}, CONFIG_NAME, WEIGHTS_NAME, extra
    )


def _signpost_fits(folder: Path) -> bool:
    """Whether PEFT's signpost may be written into `folder` (no model there, no adapter_config.json but lofit's)."""
    if (folder / "config.json").exists():
        return False
    existing = folder / PEFT_CONFIG_NAME
    if not os.path.lexists(existing):
        return True
    try:
        return existing.read_text(encoding="utf-8") == PEFT_SIGNPOST
    except (OSError, UnicodeDecodeError):
        return False


# ------------------------------------------------------------- the adapter as one state dict
def adapter_state(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter as one flat dict of tensors: `tensors` plus the config document as UTF-8 bytes.

    This is `LofitModel.state_dict()`, which transformers' Trainer writes as `model.safetensors` (it cannot
    write anything but tensors); `LofitModel.from_pretrained` reads such a folder like an adapter folder.

    Example:
        >>> document = {"format": "lofit-adapter", "format_version": 1}
        >>> state = adapter_state(document, {"layers.0.offset": torch.zeros(1, 2)})
        >>> sorted(state), state_document(state, "x")["format"]
        (['layers.0.offset', 'lofit_config'], 'lofit-adapter')
    """
    raw = json.dumps(document, separators=(",", ":")).encode("utf-8")
    return {STATE_CONFIG_KEY: torch.tensor(list(raw), dtype=torch.uint8), **tensors}


def state_document(state: dict[str, torch.Tensor], source: str | os.PathLike[str]) -> dict[str, Any]:
    """The config document inside an `adapter_state` dict, format-checked; `source` names it in errors."""
    raw = state.get(STATE_CONFIG_KEY)
    if raw is None or raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() > MAX_CONFIG_BYTES:
        raise AdapterLoadError(
            f"{source}: no {STATE_CONFIG_KEY!r} entry: this is not the state of a LofitModel (a LoFiT adapter "
            "saved by transformers.Trainer). Load base weights with model.get_base_model().load_state_dict(...)"
        )
    try:
        document = json.loads(bytes(raw.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise AdapterLoadError(f"{source}: entry {STATE_CONFIG_KEY!r} is not valid JSON ({error})") from None
    return check_document(document, source, FORMAT_NAME, FORMAT_VERSION, "LoFiT adapter")


def state_file(path: str | os.PathLike[str]) -> Path | None:
    """`path/model.safetensors` if `path` is a folder transformers' Trainer wrote for a LofitModel, else None."""
    candidate = Path(path) / STATE_NAME
    return candidate if not (Path(path) / CONFIG_NAME).exists() and candidate.is_file() else None


def read_adapter_config(path: str | os.PathLike[str]) -> tuple[LofitConfig, dict[str, Any]]:
    """Parse and validate the adapter's config; returns the adapter config and the base-model identity.

    `path` is a folder written by `save_pretrained` (`lofit_config.json`) or by transformers' Trainer
    (`model.safetensors` holding `LofitModel.state_dict()`).
    """
    trainer_file = state_file(path)
    if trainer_file is not None:
        state = read_tensors(path, STATE_NAME)
        config, stored = parse_adapter_document(state_document(state, trainer_file), trainer_file)
        return config, unpack_identity(stored, state, str(trainer_file))
    config_path = Path(path) / CONFIG_NAME
    if not config_path.exists() and not config_path.is_symlink():
        recover(path)  # a replacement of this folder killed half way leaves a backup to restore
    if not config_path.exists() and (Path(path) / PEFT_CONFIG_NAME).is_file():
        raise AdapterLoadError(
            f"{path} is a PEFT adapter ({PEFT_CONFIG_NAME}, no {CONFIG_NAME}), not a LoFiT one: load it with "
            "peft.PeftModel.from_pretrained(base_model, path)"
        )
    document = read_document(path, CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, "LoFiT adapter")
    config, stored = parse_adapter_document(document, config_path)
    if (
        not isinstance(stored.get("weights_fingerprint"), dict)
        or "encoding" not in stored["weights_fingerprint"]
    ):
        return config, stored  # format 1, or damaged: `check_same_base` compares or refuses it
    return config, unpack_identity(stored, read_tensors(path, WEIGHTS_NAME), str(config_path))


def parse_adapter_document(document: dict[str, Any], source: Path) -> tuple[LofitConfig, dict[str, Any]]:
    """The adapter config and base identity of a config document; `source` names it in errors."""
    for key in ("adapter", "base_model"):
        if not isinstance(document.get(key), dict):
            raise AdapterLoadError(f"{source}: field {key!r} is missing or not an object")
    try:
        config = LofitConfig.from_dict(document["adapter"])
    except (LofitConfigError, TypeError) as error:
        raise AdapterLoadError(f"{source}: field 'adapter' is invalid: {error}") from None
    if not config.heads:
        raise AdapterLoadError(f"{source}: field 'adapter.heads' lists no head")
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
    name = WEIGHTS_NAME if state_file(path) is None else STATE_NAME
    tensors = adapter_tensors(read_tensors(path, name), Path(path) / name)
    check_adapter_tensors(tensors, config, head_dim, Path(path) / name, compute_dtype)
    return tensors


def adapter_tensors(tensors: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """The vectors of a weights file or state, one tensor per layer: config and fingerprint left out."""
    kept = {k: v for k, v in tensors.items() if k != STATE_CONFIG_KEY and k not in FINGERPRINT_KEYS}
    return unpack_vectors(kept, source)


def check_adapter_tensors(
    tensors: dict[str, torch.Tensor],
    config: LofitConfig,
    head_dim: int,
    weights_path: Path,
    compute_dtype: torch.dtype = torch.float32,
) -> None:
    """Refuse `tensors` unless they are exactly the ones `config` names, well typed and shaped (see above)."""
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
