"""The worker extension that adds, removes and lists adapters inside a running engine.

vLLM mixes `worker_extension_cls` into its worker class; its methods are then called on every worker with
`LLM.collective_rpc("lofit_add_adapter", args=(...))` (offline) or `EngineClient.collective_rpc` (the
OpenAI server), while the engine keeps serving. Each worker reads the adapter files itself.
"""

from __future__ import annotations

from typing import Any

from ...errors import LofitRuntimeError

WORKER_EXTENSION = "lofit.integrations.vllm.worker.LofitWorkerExtension"


class LofitWorkerExtension:
    """Methods vLLM adds to its workers (`self` is the worker; `self.model_runner` holds the model)."""

    model_runner: Any

    def _lofit(self) -> Any:
        serving = getattr(self.model_runner.get_model(), "lofit", None)
        if serving is None:
            raise LofitRuntimeError(
                "this engine does not serve lofit adapters: start it with lofit's architecture "
                "(lofit.integrations.vllm.LofitEngine or `lofit serve`)"
            )
        return serving

    def lofit_add_adapter(self, name: str, name_or_path: str) -> dict[str, Any]:
        """Register the adapter at `name_or_path` (a folder or a Hub id) as `name`."""
        row = self._lofit().add_adapter(name, name_or_path)
        return {"name": name, "row": row}

    def lofit_remove_adapter(self, name: str) -> None:
        """Unregister `name`."""
        self._lofit().remove_adapter(name)

    def lofit_adapters(self) -> list[str]:
        """The registered adapter names."""
        names: list[str] = self._lofit().adapter_names
        return names

    def lofit_table_bytes(self) -> dict[str, int]:
        """Table memory: bytes per adapter row and allocated in all (capacity included)."""
        tables = self._lofit().tables
        total = tables.offset.numel() * tables.offset.element_size()
        if tables.scale is not None:
            total += tables.scale.numel() * tables.scale.element_size()
        return {"per_adapter": tables.bytes_per_adapter(), "allocated": total, "rows": tables.offset.shape[1]}
