# Two entry points: `make demo` (the main job) and `make test` (the suite).
# Each creates the virtual environment when there is none.
#
# torch: an existing torch importable by $(PYTHON) is kept (the venv then sees
# the system site-packages). Otherwise $(TORCH_SPEC) is installed first, so that
# pip never resolves a bare `torch` to a multi-GB CUDA build. GPU users: see
# README "Installing on a GPU machine".

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEMO_EXTRAS ?= lab
# bench: the peers the benchmarks race (info-nce-pytorch), which tests/test_bench_fairness.py checks them against.
TEST_EXTRAS ?= lab,test,text,st,bench

.PHONY: venv demo test test-all bench gpu-check clean

$(PY):
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "keeping the installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q "$(TORCH_SPEC)"; \
	fi

# One stamp per set of extras: `make demo` does not install the test tools.
$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[$*]"
	@touch $@

venv: $(VENV)/.installed-$(TEST_EXTRAS)

demo: $(VENV)/.installed-$(DEMO_EXTRAS)
	$(PY) -m negbatch.cli demo

# The suite runs in one worker process per core (pytest-xdist); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= auto

test: $(VENV)/.installed-$(TEST_EXTRAS)
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS)

test-all: $(VENV)/.installed-$(TEST_EXTRAS)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

bench: $(VENV)/.installed-$(TEST_EXTRAS)
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]  # 5: no test is marked slow
	$(PY) bench/run.py

# The checks that need a CUDA device (CUDA tests, GPU memory of the cache, images/s on a ResNet-18).
gpu-check: $(VENV)/.installed-$(TEST_EXTRAS)
	PY=$(PY) bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
