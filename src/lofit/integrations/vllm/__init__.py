"""Serve many LoFiT adapters from one vLLM engine (`pip install lofit[vllm]`; `lofit serve`).

Modules, one job each:

- `tables`: per-layer tables of the adapters' dense vectors and the per-token edit (no vLLM import);
- `adapter_files`: read a saved adapter and check it against the served model;
- `routing`: which adapter each row of vLLM's persistent batch uses (no vLLM import);
- `router`: the logits processor that keeps `routing` in step with vLLM's batch (changes no logit);
- `model_classes`: vLLM's Llama / Qwen2 / Mistral / Qwen3 classes with the tables applied before `o_proj`;
- `plugin`: the `vllm.general_plugins` entry point (model registration);
- `worker`: the worker extension that adds / removes adapters in a running engine;
- `engine`: the offline API, `LofitEngine`;
- `server`: the OpenAI server's endpoint plugin (a request's "model" names its adapter) and `lofit serve`.

Nothing here is imported by `import lofit`; importing `engine`, `model_classes`, `router` or `server` needs vLLM.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LofitEngine"]


def __getattr__(name: str) -> Any:
    if name == "LofitEngine":
        from .engine import LofitEngine

        return LofitEngine
    raise AttributeError(name)
