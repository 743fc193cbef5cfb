# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both set up .venv on first use: torch==2.13.0 (CPU build) is installed only when no torch is
# importable; a torch you already have (e.g. a CUDA build) is kept and used.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.compactfusion-installed

.PHONY: setup demo codec-demo test test-fast lint gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the torch already installed for $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e ".[xdit,dev]"
	@touch $(STAMP)

demo: setup
	$(PY) examples/tiny_flux_demo.py

codec-demo: setup
	$(PY) examples/codec_demo.py

# pytest exits 5 when it collects no test: treat that as a failure too.
test: setup
	@$(PY) -m pytest -q --durations=15 tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

# In-process unit tests only (codecs, config, residual state, memory, tracking): no spawned
# ranks, no xfuser pipelines; about 20 s on 2 cores. `make test` runs everything.
FAST_TESTS := tests/test_config.py tests/test_codec_raw.py tests/test_codecs_quantized.py \
	tests/test_policy.py tests/test_backend.py tests/test_tracking.py tests/test_memory.py \
	tests/test_lowrank.py tests/test_residual.py tests/test_codec_hardening.py \
	tests/test_checksum.py tests/test_thread_safety.py tests/test_timeouts.py
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(FAST_TESTS)

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# GPU validation on one H100/H200 (issue 15; see the top of benchmarks/gpu_check.sh for the
# device command). Without a GPU: make gpu-check GPU_CHECK_ARGS=--dry-run
gpu-check: setup
	bash benchmarks/gpu_check.sh --python $(PY) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info outputs
