"""vLLM's OpenAI-compatible server with lofit adapters: a request's "model" names its adapter.

`LofitEndpoints` is a `vllm.endpoint_plugins` entry point (vLLM loads it when `VLLM_PLUGINS` names
"lofit", which `lofit serve` sets). It

- adds an ASGI middleware in front of `/v1/completions` and `/v1/chat/completions`: a body whose
  "model" is a registered adapter is sent on as a request for the base model with
  `vllm_xargs.lofit_adapter` (the adapter the model applies) and a `cache_salt` keyed by the adapter
  (vLLM's prefix cache then never shares blocks across adapters); a body naming an unknown adapter in
  `vllm_xargs` is answered 404 before it reaches the engine;
- lists the adapters in `GET /v1/models` (as vLLM lists LoRA modules) and serves
  `GET/POST /v1/lofit/adapters` and `DELETE /v1/lofit/adapters/{name}` to add and remove adapters while
  the server runs (through the workers' `lofit_*` methods, `lofit.integrations.vllm.worker`);
- registers the adapters `lofit serve --adapter NAME=PATH` passed (environment `LOFIT_VLLM_ADAPTERS`).
"""

from __future__ import annotations

import json
import os
from argparse import Namespace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import State

from ...errors import LofitError
from .adapter_files import ServedModel, checkpoint_projections, read_dense_vectors
from .engine import adapter_digest, cache_salt
from .routing import ADAPTER_KEY

ADAPTERS_ENV = "LOFIT_VLLM_ADAPTERS"
"""JSON {name: path} of the adapters to register at start (set by `lofit serve`)."""
ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")


class AdapterRegistry:
    """The adapters the server knows (name -> digest) and the rewrite of requests that name one."""

    def __init__(self) -> None:
        self.digests: dict[str, str] = {}
        self.paths: dict[str, str] = {}
        self.base_name = ""
        self.engine: Any = None
        self.served: ServedModel | None = None

    def rewrite(self, body: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """(the body to forward, None) or (None, why it is refused) for one completion request."""
        extra = body.get("vllm_xargs")
        named = extra.get(ADAPTER_KEY) if isinstance(extra, dict) else None
        model = body.get("model")
        if isinstance(model, str) and model in self.digests:
            if named is not None and named != model:
                return None, f"model {model!r} and vllm_xargs.{ADAPTER_KEY} {named!r} disagree"
            named = model
            body["model"] = self.base_name
        if named is None:
            return body, None
        if named not in self.digests:
            return None, f"no lofit adapter named {named!r}; registered: {sorted(self.digests)}"
        body["vllm_xargs"] = {**(extra if isinstance(extra, dict) else {}), ADAPTER_KEY: named}
        salt = cache_salt(named, self.digests[named])
        own = body.get("cache_salt")
        body["cache_salt"] = f"{salt}:{own}" if own else salt
        return body, None

    async def add(self, name: str, path: str) -> None:
        """Check the adapter here, register it on every worker, then accept requests for it."""
        if not name or name in self.digests or name == self.base_name:
            raise LofitError(f"adapter name {name!r} is empty, registered already or the base's name")
        assert self.served is not None
        read_dense_vectors(path, self.served)
        digest = adapter_digest(path)
        await self.engine.collective_rpc("lofit_add_adapter", args=(name, path))
        self.digests[name], self.paths[name] = digest, path

    async def remove(self, name: str) -> None:
        """Refuse new requests for `name` at once; the workers free it when no request uses it."""
        if name not in self.digests:
            raise LofitError(f"no lofit adapter named {name!r}; registered: {sorted(self.digests)}")
        del self.digests[name], self.paths[name]
        await self.engine.collective_rpc("lofit_remove_adapter", args=(name,))


def _error(status: int, message: str) -> JSONResponse:
    kind = "NotFoundError" if status == 404 else "BadRequestError"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class AdapterRouting:
    """ASGI middleware: rewrites completion requests that name an adapter (see `AdapterRegistry.rewrite`)."""

    def __init__(self, app: Any, registry: AdapterRegistry) -> None:
        self.app = app
        self.registry = registry

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in ROUTED_PATHS:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        try:
            body = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):  # not ours to judge: vLLM answers it
            await self.app(scope, _replay(b"".join(chunks), receive), send)
            return
        rewritten, refusal = self.registry.rewrite(body)
        if rewritten is None:
            await _error(404, refusal or "")(scope, receive, send)
            return
        raw = json.dumps(rewritten).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        await self.app({**scope, "headers": headers}, _replay(raw, receive), send)


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later reads wait for the client's disconnect

    return replayed


class LofitEndpoints:
    """The `vllm.endpoint_plugins` entry point (see the module docstring)."""

    name = "lofit"
    required_tasks = None

    def __init__(self) -> None:
        self.registry = AdapterRegistry()

    def attach_router(self, app: FastAPI) -> None:
        """Add the request rewriting middleware and the adapter routes."""
        registry = self.registry
        app.add_middleware(AdapterRouting, registry=registry)

        @app.get("/v1/models")
        async def models(request: Request) -> JSONResponse:
            listing = await request.app.state.openai_serving_models.show_available_models()
            content = listing.model_dump()
            for name, path in registry.paths.items():
                content["data"].append(
                    {
                        "id": name,
                        "object": "model",
                        "owned_by": "lofit",
                        "root": path,
                        "parent": registry.base_name,
                    }
                )
            return JSONResponse(content)

        @app.get("/v1/lofit/adapters")
        async def list_adapters() -> JSONResponse:
            return JSONResponse({"base": registry.base_name, "adapters": registry.paths})

        @app.post("/v1/lofit/adapters")
        async def add_adapter(request: Request) -> JSONResponse:
            body = await request.json()
            if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body.get("path"):
                return _error(400, 'send {"name": NAME, "path": FOLDER_OR_HUB_ID}')
            try:
                await registry.add(body["name"], str(body["path"]))
            except (LofitError, OSError) as error:
                return _error(400, str(error))
            return JSONResponse({"added": body["name"]})

        @app.delete("/v1/lofit/adapters/{name}")
        async def remove_adapter(name: str) -> JSONResponse:
            try:
                await registry.remove(name)
            except LofitError as error:
                return _error(404, str(error))
            return JSONResponse({"removed": name})

    async def init_state(self, engine_client: Any, state: State, args: Namespace) -> None:
        """Learn the base's name and the served model, then register the adapters given at start."""
        registry = self.registry
        registry.engine = engine_client
        names = getattr(args, "served_model_name", None) or [args.model]
        registry.base_name = names[0]
        config = engine_client.model_config.hf_config
        registry.served = ServedModel.from_hf_config(
            getattr(config, "get_text_config", lambda: config)(),
            checkpoint_projections(args.model, getattr(args, "revision", None)),
        )
        for name, path in json.loads(os.environ.get(ADAPTERS_ENV) or "{}").items():
            await registry.add(name, path)
