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
EXTRAS ?= lab,test

.PHONY: venv demo test test-all bench clean

$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "keeping the installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q "$(TORCH_SPEC)"; \
	fi
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m negbatch.cli demo

test: venv
	$(PY) -m pytest -q -m "not slow"

test-all: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]  # 5: no test is marked slow
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
