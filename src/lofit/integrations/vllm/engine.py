"""The offline API: one vLLM `LLM` serving its base model and any number of lofit adapters.

`LofitEngine(model, adapters={...}, **llm_kwargs)` builds a plain `vllm.LLM` whose architecture is lofit's
wrapper of the base's (`hf_overrides`), with the plugin's worker extension; `engine.llm` is that `LLM`.
A request names its adapter in two places, which `engine.prompt(...)` and `engine.sampling_params(...)`
fill in for it:

- `SamplingParams.extra_args["lofit_adapter"]`: the adapter the model applies to its tokens;
- the prompt's `cache_salt`: "lofit:<name>:<digest of the adapter files>", so vLLM's prefix cache never
  gives a request key/value blocks computed under another adapter (or the base, or an adapter of the
  same name registered earlier with other vectors). vLLM salts its block hashes with it as it does for
  LoRA requests.

Example (not run here: it needs vLLM):
    >>> from vllm import SamplingParams                                       # doctest: +SKIP
    >>> engine = LofitEngine("HuggingFaceTB/SmolLM2-135M", adapters={"math": "runs/math/adapter"},
    ...                      dtype="float32")                                 # doctest: +SKIP
    >>> greedy = SamplingParams(max_tokens=16, temperature=0)                 # doctest: +SKIP
    >>> outputs = engine.generate(["2+2=", "2+2="], greedy, adapters=["math", None])  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ...adapters.hub import resolve_adapter_dir
from ...adapters.persistence import CONFIG_NAME, WEIGHTS_NAME
from ...errors import LofitValueError
from .adapter_files import ServedModel, checkpoint_projections, read_dense_vectors
from .plugin import lofit_architecture, register
from .routing import ADAPTER_KEY
from .worker import WORKER_EXTENSION


def adapter_digest(name_or_path: str | os.PathLike[str]) -> str:
    """A digest of an adapter's files (config and weights): part of its requests' prefix-cache salt."""
    folder = resolve_adapter_dir(name_or_path)
    digest = hashlib.sha256()
    for file_name in (CONFIG_NAME, WEIGHTS_NAME):
        digest.update((folder / file_name).read_bytes())
    return digest.hexdigest()[:16]


def cache_salt(name: str, digest: str) -> str:
    """The prefix-cache salt of an adapter's requests.

    Example:
        >>> cache_salt("math", "0123abcd")
        'lofit:math:0123abcd'
    """
    return f"lofit:{name}:{digest}"


def base_architectures(model: str, revision: str | None = None, trust_remote_code: bool = False) -> list[str]:
    """The `architectures` of a model's config (a folder or a Hub id)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    return list(getattr(config, "architectures", None) or [])


class LofitEngine:
    """A vLLM engine serving `model` and lofit adapters; adapters can be added and removed while it runs.

    Args:
        model: the base model (a folder or a Hub id), as for `vllm.LLM`.
        adapters: name -> adapter folder or Hub id, registered at start.
        **llm_kwargs: passed to `vllm.LLM` (dtype, max_model_len, enable_prefix_caching, ...).
    """

    def __init__(self, model: str, adapters: Mapping[str, str] | None = None, **llm_kwargs: Any) -> None:
        from vllm import LLM

        register()  # in this process too (vLLM's plugin loading does it where lofit is installed)
        architecture = lofit_architecture(
            base_architectures(
                model, llm_kwargs.get("revision"), bool(llm_kwargs.get("trust_remote_code", False))
            )
        )
        overrides = dict(llm_kwargs.pop("hf_overrides", None) or {})
        overrides["architectures"] = [architecture]
        llm_kwargs.setdefault("worker_extension_cls", WORKER_EXTENSION)
        llm_kwargs.setdefault("enforce_eager", True)  # the plugin refuses compiled graphs
        from .router import LofitAdapterRouter

        processors = list(llm_kwargs.pop("logits_processors", None) or [])
        processors.append(LofitAdapterRouter)  # inert if vLLM's entry point loaded it already
        self.llm = LLM(model=model, hf_overrides=overrides, logits_processors=processors, **llm_kwargs)
        self.served = ServedModel.from_hf_config(
            self.llm.llm_engine.model_config.hf_config.get_text_config(),
            checkpoint_projections(model, llm_kwargs.get("revision")),
        )
        self._digests: dict[str, str] = {}
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)

    # ------------------------------------------------------------------------------ adapters
    @property
    def adapters(self) -> list[str]:
        """The registered adapter names."""
        return list(self._digests)

    def add_adapter(self, name: str, name_or_path: str | os.PathLike[str]) -> None:
        """Register an adapter (a folder or a Hub id) under `name`; requests can name it at once."""
        if not isinstance(name, str) or not name or name in self._digests:
            raise LofitValueError(f"adapter name {name!r} is empty or registered already; choose another")
        read_dense_vectors(name_or_path, self.served)  # refuse a bad adapter here, not in the engine
        digest = adapter_digest(name_or_path)
        self.llm.collective_rpc("lofit_add_adapter", args=(name, os.fspath(name_or_path)))
        self._digests[name] = digest

    def remove_adapter(self, name: str) -> None:
        """Unregister `name` (no request for it may be running or waiting)."""
        if name not in self._digests:
            raise LofitValueError(f"no adapter named {name!r}; registered: {self.adapters}")
        self.llm.collective_rpc("lofit_remove_adapter", args=(name,))
        del self._digests[name]

    # ------------------------------------------------------------------------------ requests
    def _check(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self._digests:
            raise LofitValueError(f"no adapter named {adapter!r}; registered: {self.adapters} (None: base)")

    def prompt(self, prompt: str | list[int] | Mapping[str, Any], adapter: str | None) -> dict[str, Any]:
        """A vLLM prompt (text, token ids or a prompt dict) salted for `adapter`'s prefix-cache blocks."""
        self._check(adapter)
        if isinstance(prompt, str):
            request: dict[str, Any] = {"prompt": prompt}
        elif isinstance(prompt, Mapping):
            request = dict(prompt)
        else:
            request = {"prompt_token_ids": list(prompt)}
        if adapter is not None:
            request["cache_salt"] = cache_salt(adapter, self._digests[adapter])
        return request

    def sampling_params(self, params: Any, adapter: str | None) -> Any:
        """A copy of `params` (a `vllm.SamplingParams`) that names `adapter` (None: the base)."""
        self._check(adapter)
        copy = params.clone()
        extra = dict(copy.extra_args or {})
        extra.pop(ADAPTER_KEY, None)
        if adapter is not None:
            extra[ADAPTER_KEY] = adapter
        copy.extra_args = extra or None
        return copy

    def generate(
        self,
        prompts: Sequence[str | list[int] | Mapping[str, Any]],
        sampling_params: Any,
        adapters: Sequence[str | None],
        **kwargs: Any,
    ) -> list[Any]:
        """`LLM.generate` with one adapter (or None) per prompt; rows of one batch mix adapters freely."""
        if len(adapters) != len(prompts):
            raise LofitValueError(
                f"{len(prompts)} prompt(s) but {len(adapters)} adapter name(s); give one each"
            )
        requests = [self.prompt(p, a) for p, a in zip(prompts, adapters, strict=True)]
        params = [self.sampling_params(sampling_params, a) for a in adapters]
        outputs: list[Any] = self.llm.generate(requests, params, **kwargs)
        return outputs
