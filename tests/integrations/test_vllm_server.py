"""`lofit serve`: vLLM's OpenAI-compatible server where a request's "model" names its adapter.

The server runs as a subprocess (`lofit serve --model M --adapter NAME=PATH ...` with vLLM's own flags);
completions of the base and of adapters, sent concurrently (so they share batches) and with one prompt
(so the prefix cache would be shared if it were not keyed by adapter), must equal lofit's own generate.
The README's example runs as pasted on the bundled model (slow). Skipped (with the reason) where vLLM
cannot be imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not importable here; `make vllm-test` builds .venv-vllm")

from integrations.vllm_support import NEW_TOKENS, TOLERANCE, Oracle, save_model_and_adapters

README = Path(__file__).resolve().parents[2] / "README.md"
STARTUP_S = 600


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def call(port: int, path: str, body: dict[str, Any] | None = None, method: str = "GET") -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def environment() -> dict[str, str]:
    """This interpreter's bin first on PATH (its `lofit` script), less CPU memory than vLLM's default."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Servers started by a test; each is stopped (its whole process group) afterwards."""
    servers: list[subprocess.Popen[bytes]] = []
    yield servers
    for server in servers:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def wait_until_up(server: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited ({server.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if call(port, "/v1/models")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(2)
    pytest.fail(f"the server did not start in {STARTUP_S} s:\n{log.read_text()[-4000:]}")


def start(command: str, cwd: Path, servers: list[subprocess.Popen[bytes]], port: int) -> None:
    log = cwd / "server.log"
    server = subprocess.Popen(
        ["bash", "-c", command],
        cwd=cwd,
        env=environment(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    servers.append(server)
    wait_until_up(server, port, log)


def complete(port: int, model: str, prompt: list[int]) -> dict[str, Any]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "logprobs": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    status, answer = call(port, "/v1/completions", body, "POST")
    assert status == 200, answer
    return dict(answer["choices"][0])


def test_requests_name_adapters_by_model_and_are_exact(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    base_dir, adapters = save_model_and_adapters("llama", tmp_path)
    oracle = Oracle.from_folders(base_dir, adapters)
    port = free_port()
    command = (
        f"lofit serve --model {base_dir} --adapter first={adapters['first']} --adapter scaled={adapters['scaled']} "
        f"--port {port} --served-model-name tiny --dtype float32 --enforce-eager --max-model-len 256 "
        "--kv-cache-memory-bytes 67108864 --block-size 32 --max-num-batched-tokens 32 --seed 0"
    )
    start(command, tmp_path, started, port)
    status, listing = call(port, "/v1/models")
    assert {card["id"] for card in listing["data"]} == {"tiny", "first", "scaled"}

    prompt = list(range(3, 83))  # 80 tokens: two whole cache blocks, the same for every request
    models = ["tiny", "first", "scaled", "tiny", "first", "scaled"]
    with ThreadPoolExecutor(len(models)) as pool:  # concurrent: one batch mixes the adapters
        answers = list(pool.map(lambda model: complete(port, model, prompt), models))
    for model, answer in zip(models, answers, strict=True):
        adapter = None if model == "tiny" else model
        want_tokens, want_logprobs = oracle(prompt, adapter)
        assert answer["token_ids"] == want_tokens, model
        worst = max(
            abs(a - b) for a, b in zip(answer["logprobs"]["token_logprobs"], want_logprobs, strict=True)
        )
        assert worst <= TOLERANCE, (model, worst)

    # Added and removed while the server runs; unknown names are refused before the engine.
    assert call(port, "/v1/lofit/adapters", {"name": "wide", "path": str(adapters["wide"])}, "POST")[0] == 200
    assert complete(port, "wide", prompt)["token_ids"] == oracle(prompt, "wide")[0]
    assert call(port, "/v1/lofit/adapters/wide", method="DELETE")[0] == 200
    status, refused = call(
        port, "/v1/completions", {"model": "wide", "prompt": prompt, "max_tokens": 2}, "POST"
    )
    assert status == 404, refused
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "vllm_xargs": {"lofit_adapter": "nope"}}
    status, refused = call(port, "/v1/completions", body, "POST")
    assert status == 404 and "no lofit adapter named 'nope'" in refused["error"]["message"]
    status, refused = call(
        port, "/v1/lofit/adapters", {"name": "x", "path": str(tmp_path / "missing")}, "POST"
    )
    assert status == 400


def readme_serving_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Serving many adapters with vLLM", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return next(block for block in blocks if "lofit serve" in block and "curl" in block)


@pytest.mark.slow
def test_the_readme_example_works_as_pasted(tmp_path: Path, started: list[subprocess.Popen[bytes]]) -> None:
    """The README's commands, verbatim but for the port (8000 may be taken here), on the bundled model."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    from lofit import LofitConfig, get_lofit_model, load_model

    block = readme_serving_block()
    adapter_dir = re.search(r"--adapter \w+=(\S+)", block)
    assert adapter_dir is not None
    model, _ = load_model("smollm2-135m")
    get_lofit_model(model, LofitConfig(heads={10: [1, 2]}, init_std=0.05)).save_pretrained(
        tmp_path / adapter_dir.group(1)
    )  # stands in for `make run`'s adapter
    port = free_port()
    block = block.replace("8000", str(port))
    serve_line = next(line for line in block.splitlines() if line.startswith("lofit serve"))
    start(serve_line.rstrip(" &"), tmp_path, started, port)
    curl = block.split(serve_line, 1)[1]
    answer = subprocess.run(["bash", "-c", curl], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert answer.returncode == 0, answer.stderr
    completion = json.loads(answer.stdout)
    assert completion["choices"][0]["text"], completion
