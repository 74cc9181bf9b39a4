"""`load_model`: a causal LM and its tokenizer from a Hugging Face id, a local path or the bundled default.

The bundled default `"smollm2-135m"` (a GGUF file and its safetensors cache) is handled by
`lofit.io.bundled`; this module loads any model and places it.

Models that do not fit one device load with `device_map="auto"` (layers spread over the visible GPUs,
run in one process); `quantization="4bit"`/`"8bit"` loads the base through bitsandbytes (the
`quantization` extra, CUDA). Both are refused with a clear message when LoFiT could not train on the
result (layers offloaded to CPU/disk, no GPU, bitsandbytes missing).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import LofitValueError, ModelLoadError
from .bundled import (
    BUNDLED_MODELS,
    CACHE_ENV,
    CACHE_MARKER,
    DEFAULT_MODEL,
    BundledModel,
    bundled_checkpoint,
    bundled_gguf_path,
    check_bundled,
    dequantize_gguf,
    resolve_cache_dir,
)
from .quantization import QUANTIZATIONS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "BUNDLED_MODELS",
    "CACHE_ENV",
    "CACHE_MARKER",
    "DEFAULT_MODEL",
    "BundledModel",
    "ModelLoadError",
    "bundled_checkpoint",
    "bundled_gguf_path",
    "check_bundled",
    "check_placement",
    "load_model",
    "parse_dtype",
    "placement_kwargs",
    "resolve_cache_dir",
]

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
    """A torch dtype from a dtype or its name ("bf16", "float32", ...); None and "auto" pass through.

    Args:
        dtype: a `torch.dtype`, a name, "auto" or None.

    Returns:
        The dtype (or "auto" / None).

    Example:
        >>> parse_dtype("bf16")
        torch.bfloat16
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise LofitValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


def _from_pretrained(
    path: str, dtype: torch.dtype | str | None, model_kwargs: dict[str, Any] | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
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


def placement_kwargs(
    device_map: str | dict[str, Any] | None, quantization: str | None, dtype: torch.dtype | str | None
) -> dict[str, Any]:
    """from_pretrained keyword arguments for `device_map` and bitsandbytes `quantization`.

    Args:
        device_map: None, a strategy such as "auto", or a dict.
        quantization: None, "4bit" or "8bit".
        dtype: the compute dtype for 4-bit weights (default bf16).

    Returns:
        The keyword arguments; raises ModelLoadError when bitsandbytes or a CUDA GPU is missing.
    """
    kwargs: dict[str, Any] = {}
    if quantization is not None:
        if quantization not in QUANTIZATIONS:
            raise LofitValueError(
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
    """Refuse a device map that offloads modules to CPU or disk next to accelerators.

    Offloaded weights live on the meta device between calls, where LoFiT's adapters (and their gradients)
    cannot.

    Args:
        model: a loaded model (its `hf_device_map`, if any, is checked).

    Raises:
        ModelLoadError: naming an offloaded module and what to do instead.
    """
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


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: str | dict[str, Any] | None) -> None:
    """Refuse a `device_map` string that names no strategy or device, or a device this machine lacks.

    Args:
        device_map: None, a dict (checked by transformers), a strategy ("auto", "balanced",
            "balanced_low_0", "sequential") or a device ("cpu", "cuda", "cuda:N", "mps", "N").

    Raises:
        LofitValueError: an unknown value; ModelLoadError: a device that is not available.
    """
    if device_map is None or isinstance(device_map, dict) or device_map in DEVICE_MAP_STRATEGIES:
        return
    text = str(device_map)
    cuda = re.fullmatch(r"(?:cuda:)?(\d+)|cuda", text)
    if cuda is not None:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(cuda.group(1) or 0)
        if index >= available:
            seen = f"{available} CUDA GPU(s) are visible" if available else "no CUDA GPU is visible"
            raise ModelLoadError(
                f"device_map={text!r} needs CUDA GPU {index}, but {seen}; leave --device-map out to load on "
                "the CPU, or use 'auto'"
            )
        return
    if text == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device_map='mps' but no Apple GPU (MPS) is available; leave --device-map out")
    if text not in ("cpu", "mps"):
        raise LofitValueError(
            f"device_map={text!r} is neither a placement strategy nor a device; use one of "
            f"{', '.join(DEVICE_MAP_STRATEGIES)}, cpu, cuda or cuda:N"
        )


def _load_bundled(
    name: str,
    dtype: torch.dtype | str | None,
    model_kwargs: dict[str, Any],
    cache_dir: str | os.PathLike[str] | None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    directory = bundled_checkpoint(name, cache_dir)
    try:
        model, tokenizer = _from_pretrained(str(directory), dtype, model_kwargs)
    except (OSError, ValueError, SafetensorError, ModelLoadError) as error:
        raise ModelLoadError(
            f"the cached copy of {name!r} in {directory} cannot be loaded ({error}); delete that "
            "directory and it is rebuilt from the GGUF file"
        ) from None
    check_bundled(name, model, tokenizer, source=directory)
    return model, tokenizer


def _load_source(
    source: str,
    dtype: torch.dtype | str | None,
    model_kwargs: dict[str, Any],
    cache_dir: str | os.PathLike[str] | None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    path = Path(source).expanduser()
    if source.lower() in BUNDLED_MODELS and not path.exists():
        return _load_bundled(source.lower(), dtype, model_kwargs, cache_dir)
    if path.is_file() and path.suffix == ".gguf":
        if model_kwargs:
            raise LofitValueError(
                f"{source}: device_map/quantization are not supported for .gguf files; load the bundled "
                "name or a saved model directory instead"
            )
        model, tokenizer = dequantize_gguf(path)
        if dtype not in (None, "auto"):
            model.to(dtype)
        return model, tokenizer
    if not path.exists() and (path.is_absolute() or source.startswith((".", "~"))):
        raise ModelLoadError(
            f"model path {source!r} does not exist; pass an existing model directory, a Hugging Face "
            f"id or the bundled default {DEFAULT_MODEL!r}"
        )
    if path.exists() and not path.is_dir():
        raise ModelLoadError(
            f"model path {source!r} is a file; pass the model's directory (with config.json)"
        )
    return _from_pretrained(source, dtype, model_kwargs)


def _loaded_or_clear_error(
    source: str,
    dtype: torch.dtype | str | None,
    model_kwargs: dict[str, Any],
    cache_dir: str | os.PathLike[str] | None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """`_load_source`, with the errors transformers raises for a bad checkpoint turned into ModelLoadError."""
    try:
        return _load_source(source, dtype, model_kwargs, cache_dir)
    except (LofitValueError, ModelLoadError):
        raise
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
    except (ValueError, KeyError, RecursionError) as error:  # e.g. an unknown model_type in config.json
        raise ModelLoadError(f"cannot load model {source!r}: {error}") from None


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    device_map: str | dict[str, Any] | None = None,
    quantization: str | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: a local directory, a `.gguf` file, a Hugging Face id, or the bundled `"smollm2-135m"`.
        dtype: a torch dtype or name ("bf16", "float32", "auto"); None keeps transformers' default.
        device: where to move the model (instead of `device_map`).
        cache_dir: the bundled model's cache root (see `lofit.io.bundled.resolve_cache_dir`).
        device_map: "auto" (or a dict) spreads the layers over the visible devices.
        quantization: "4bit" (NF4) or "8bit" loads the weights through bitsandbytes (CUDA only).

    Returns:
        `(model, tokenizer)`; a tokenizer without a pad token gets its eos token as pad token.

    Example:
        >>> model, tokenizer = load_model("smollm2-135m", dtype="bf16")   # doctest: +SKIP
    """
    dtype = parse_dtype(dtype)
    if device is not None and (device_map is not None or quantization is not None):
        raise LofitValueError(
            "pass either device or device_map/quantization, not both (device_map places the model)"
        )
    check_device_map(device_map)
    model_kwargs = placement_kwargs(device_map, quantization, dtype)
    model, tokenizer = _loaded_or_clear_error(str(name_or_path), dtype, model_kwargs, cache_dir)
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
