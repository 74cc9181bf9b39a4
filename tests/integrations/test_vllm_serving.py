"""lofit adapters served by vLLM are exact: the tokens and log-probabilities of lofit's own `generate`.

Each scenario runs one vLLM engine per architecture (llama, qwen2) with prefix caching and chunked prefill
on, in fp32, greedy, and compares every request with `LofitModel.generate(adapter_names=[...])` on the
same weights: equal tokens and |Δ logprob| <= 1e-4. Skipped (with the reason) where vLLM cannot be
imported; `make vllm-test` builds an environment where it can.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not importable here; `make vllm-test` builds .venv-vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: faster, and pytest-friendly

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from integrations.vllm_support import NEW_TOKENS, TOLERANCE, Oracle, save_model_and_adapters  # noqa: E402
from lofit import LofitConfig, get_lofit_model  # noqa: E402
from lofit.integrations.vllm.engine import LofitEngine  # noqa: E402
from lofit.integrations.vllm.routing import ADAPTER_KEY  # noqa: E402
from tiny_models import tiny_vllm_config  # noqa: E402


def greedy(**extra: Any) -> Any:
    return vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True, **extra)


def tokens_and_logprobs(output: Any) -> tuple[list[int], list[float]]:
    completion = output.outputs[0]
    tokens = list(completion.token_ids)
    return tokens, [completion.logprobs[i][t].logprob for i, t in enumerate(tokens)]


def max_difference(oracle: Oracle, prompt: list[int], adapter: str | None, output: Any) -> float:
    """|Δ logprob| against lofit's generate; fails on any token difference."""
    want_tokens, want_logprobs = oracle(prompt, adapter)
    tokens, logprobs = tokens_and_logprobs(output)
    assert tokens == want_tokens, f"adapter {adapter}: vLLM {tokens} != lofit {want_tokens}"
    return max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True))


# (architecture, scenario) -> worst |Δ logprob|, printed (and written to $LOFIT_VLLM_EXACTNESS) at the end
RESULTS: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    model_type = request.param
    base_dir, adapters = save_model_and_adapters(model_type, tmp_path_factory.mktemp(model_type))
    engine = LofitEngine(
        str(base_dir),
        adapters={name: str(path) for name, path in adapters.items()},
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        seed=0,
        kv_cache_memory_bytes=64 * 2**20,  # fixed: a second engine in this process must not count the first
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=32,  # long prompts are prefilled in chunks beside other requests' decoding
        max_num_seqs=16,
        block_size=32,  # prefix caching works in whole blocks (the CPU default is 128 tokens)
    )
    yield model_type, engine, Oracle.from_folders(base_dir, adapters), adapters
    engine.llm.llm_engine.engine_core.shutdown()


def prompt(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (length,), generator=generator).tolist()


def record(model_type: str, scenario: str, worst: float) -> None:
    RESULTS[(model_type, scenario)] = max(worst, RESULTS.get((model_type, scenario), 0.0))
    assert worst <= TOLERANCE, f"{model_type} {scenario}: |Δ logprob| {worst:.2e} > {TOLERANCE}"


def test_every_adapter_changes_the_output(served: Any) -> None:
    """The oracle itself: each adapter moves the tokens or log-probabilities (else exactness proves little)."""
    _, _, oracle, adapters = served
    for seed in range(2):
        request = prompt(seed, 9)
        base_tokens, base_logprobs = oracle(request, None)
        for name in adapters:
            tokens, logprobs = oracle(request, name)
            moved = max(abs(a - b) for a, b in zip(logprobs, base_logprobs, strict=True))
            assert tokens != base_tokens or moved > 1e-2, f"adapter {name} leaves prompt {seed} as the base"


def test_mixed_batch_of_base_and_four_adapters(served: Any) -> None:
    model_type, engine, oracle, _ = served
    names: list[str | None] = [None, "first", "middle", "scaled", "wide", None, "scaled", "first"]
    requests = [prompt(10 + i, 5 + 2 * i) for i in range(len(names))]
    outputs = engine.generate(requests, greedy(), names)
    worst = max(max_difference(oracle, p, a, o) for p, a, o in zip(requests, names, outputs, strict=True))
    record(model_type, "mixed batch", worst)


def test_continuous_batching_requests_arrive_while_others_decode(served: Any) -> None:
    model_type, engine, oracle, _ = served
    core = engine.llm.llm_engine
    first_wave: list[tuple[str, list[int], str | None]] = [
        ("w1-0", prompt(20, 7), "first"),
        ("w1-1", prompt(21, 11), None),
    ]
    second_wave = [
        ("w2-0", prompt(22, 6), "scaled"),
        ("w2-1", prompt(23, 9), "wide"),
        ("w2-2", prompt(24, 5), "middle"),
    ]
    for request_id, request, adapter in first_wave:
        core.add_request(
            request_id, engine.prompt(request, adapter), engine.sampling_params(greedy(), adapter)
        )
    finished: dict[str, Any] = {}
    steps = 0
    while core.has_unfinished_requests():
        for output in core.step():
            if output.finished:
                finished[output.request_id] = output
        steps += 1
        if steps == 3:
            assert not finished, "the first requests finished before the second wave arrived"
            for request_id, request, adapter in second_wave:
                core.add_request(
                    request_id, engine.prompt(request, adapter), engine.sampling_params(greedy(), adapter)
                )
    worst = max(
        max_difference(oracle, request, adapter, finished[request_id])
        for request_id, request, adapter in first_wave + second_wave
    )
    record(model_type, "continuous batching", worst)


def test_prefix_cache_is_keyed_by_adapter(served: Any) -> None:
    """One prompt under the base and two adapters: no request reuses blocks cached under another."""
    model_type, engine, oracle, _ = served
    shared = prompt(30, 80)  # two whole 32-token blocks
    worst = 0.0
    for adapter, cached in [(None, None), ("middle", 0), ("first", 0), ("middle", 64), (None, 64)]:
        (output,) = engine.generate([shared], greedy(), [adapter])
        if cached is not None:
            assert output.num_cached_tokens == cached, f"{adapter}: {output.num_cached_tokens} cached tokens"
        worst = max(worst, max_difference(oracle, shared, adapter, output))
    record(model_type, "prefix cache", worst)


def test_without_the_salt_the_prefix_cache_would_mix_adapters(served: Any) -> None:
    """The control: a request naming an adapter but not salted reuses the base's blocks and is wrong."""
    _, engine, oracle, _ = served
    shared = prompt(31, 80)
    engine.generate([shared], greedy(), [None])
    params = greedy(extra_args={ADAPTER_KEY: "first"})
    (unsalted,) = engine.llm.generate([{"prompt_token_ids": shared}], params)
    assert unsalted.num_cached_tokens == 64
    tokens, logprobs = tokens_and_logprobs(unsalted)
    want_tokens, want_logprobs = oracle(shared, "first")
    assert (
        tokens != want_tokens
        or max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True)) > TOLERANCE
    )


def test_chunked_prefill_beside_decoding_requests(served: Any) -> None:
    model_type, engine, oracle, _ = served
    names: list[str | None] = ["wide", "scaled", None, "first", "middle"]
    requests = [prompt(40, 75), prompt(41, 100), prompt(42, 6), prompt(43, 5), prompt(44, 70)]
    assert max(len(r) for r in requests) > 32  # > max_num_batched_tokens: prefilled in several chunks
    outputs = engine.generate(requests, greedy(), names)
    worst = max(max_difference(oracle, p, a, o) for p, a, o in zip(requests, names, outputs, strict=True))
    record(model_type, "chunked prefill", worst)


def test_adapters_are_added_and_removed_while_the_engine_runs(served: Any) -> None:
    _, engine, oracle, adapters = served
    request = prompt(50, 70)
    engine.add_adapter("late", str(adapters["middle"]))
    (output,) = engine.generate([request], greedy(), ["late"])
    max_difference(oracle, request, "middle", output)
    engine.remove_adapter("late")
    with pytest.raises(ValueError, match="no adapter named 'late'"):
        engine.generate([request], greedy(), ["late"])
    # The same name for other vectors: the new row, and a new salt (the old blocks are not reused).
    engine.add_adapter("late", str(adapters["wide"]))
    (output,) = engine.generate([request], greedy(), ["late"])
    assert output.num_cached_tokens == 0
    assert max_difference(oracle, request, "wide", output) <= TOLERANCE
    engine.remove_adapter("late")
    assert "late" not in engine.llm.collective_rpc("lofit_adapters")[0]


def test_an_adapter_for_another_base_is_refused(served: Any, tmp_path: Path) -> None:
    model_type, engine, _, _ = served
    torch.manual_seed(12345)  # the in-process engine seeded torch with 0, as the base was built
    other = AutoModelForCausalLM.from_config(tiny_vllm_config(model_type))  # same sizes, other weights
    get_lofit_model(other, LofitConfig(heads={0: [1]}, init_std=0.1)).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="differs from the one the adapter was trained on"):
        engine.add_adapter("other", str(tmp_path / "other"))
    assert "other" not in engine.adapters


@pytest.fixture(scope="module", autouse=True)
def exactness_table() -> Any:
    yield
    if not RESULTS:
        return
    scenarios = ["mixed batch", "continuous batching", "prefix cache", "chunked prefill"]
    lines = ["| architecture | " + " | ".join(scenarios) + " |", "|---" * (len(scenarios) + 1) + "|"]
    for model_type in sorted({m for m, _ in RESULTS}):
        cells = [f"{RESULTS[(model_type, s)]:.1e}" if (model_type, s) in RESULTS else "-" for s in scenarios]
        lines.append(f"| {model_type} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print("\nworst |Δ logprob| against lofit's generate (tokens equal in every cell):\n" + table)
    target = os.environ.get("LOFIT_VLLM_EXACTNESS")
    if target:
        Path(target).write_text(table + "\n", encoding="utf-8")


@pytest.mark.slow
def test_the_bundled_model_end_to_end(tmp_path: Path) -> None:
    """SmolLM2-135M (the bundled model): two adapters, one with scales, and the base in one batch."""
    from lofit import LofitModel, load_model
    from lofit.io.bundled import bundled_checkpoint

    model_dir = bundled_checkpoint()
    for seed, (name, heads, scale) in enumerate(
        [("offsets", {3: [1, 5], 20: [0]}, False), ("scales", {12: [2]}, True)]
    ):
        torch.manual_seed(seed)
        base, _ = load_model("smollm2-135m")
        get_lofit_model(base, LofitConfig(heads=heads, use_scale=scale, init_std=0.5)).save_pretrained(
            tmp_path / name
        )
    engine = LofitEngine(
        str(model_dir),
        adapters={"offsets": str(tmp_path / "offsets"), "scales": str(tmp_path / "scales")},
        dtype="float32",
        max_model_len=512,
        seed=0,
        kv_cache_memory_bytes=256 * 2**20,
        enable_prefix_caching=True,
    )
    tokenizer = engine.llm.get_tokenizer()
    texts = ["The capital of France is", "Q: What is 12 times 3?\nA:", "The capital of France is"]
    names: list[str | None] = ["offsets", None, "scales"]
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    outputs = engine.generate(prompts, greedy(), names)
    engine.llm.llm_engine.engine_core.shutdown()
    base, _ = load_model("smollm2-135m", dtype=torch.float32)
    lofit_model = LofitModel.from_pretrained(base, tmp_path / "offsets", adapter_name="offsets")
    lofit_model.load_adapter(tmp_path / "scales", adapter_name="scales")
    oracle = Oracle(lofit_model)
    for prompt, name, output in zip(prompts, names, outputs, strict=True):
        assert max_difference(oracle, prompt, name, output) <= TOLERANCE
