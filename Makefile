# One-command set-up: `make demo` runs the example grid end to end; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STL := $(VENV)/bin/stl
# `make demo` runs on a private Redis under DEMO_HOME (never STL_REDIS_URL or localhost:6379): see `stl demo --help`.
DEMO_GRID ?= grids/example.yaml
DEMO_HOME ?= $(CURDIR)/.stl-demo
# What `make demo` prints after its pivot, as `stl results --effect` does (empty: no effect table).
DEMO_EFFECT ?= mtl=none:in-domain
# pytest processes (pytest-xdist); 0 runs the suite in one process, as CI does. Two take about 10 minutes on two
# cores instead of 18, but the SIGTERM test (tests/test_fault_kill.py) failed twice in six runs that way.
TEST_WORKERS ?= 0
# torch's CPU build for machines without an NVIDIA driver; GPU machines keep pip's default (CUDA) build.
TORCH_CPU ?= torch==2.13.0

.PHONY: venv demo test lint typecheck bench clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		echo "installing $(TORCH_CPU) (no NVIDIA driver found)"; \
		$(PY) -m pip install -q "$(TORCH_CPU)"; \
	fi
	@# setuptools warns that stl/ in the tree shadows the install: it is the links to cli/, jobs/ and worker/.
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e '.[dev,embedded]'
	touch $@

demo: venv
	STL_HOME="$(DEMO_HOME)" $(STL) demo "$(DEMO_GRID)" $(if $(DEMO_EFFECT),--effect "$(DEMO_EFFECT)")

lint: venv
	$(VENV)/bin/ruff check cli jobs worker tests bench

typecheck: venv
	$(VENV)/bin/mypy

test: venv lint typecheck
	$(PY) -m pytest -q -n $(TEST_WORKERS)

bench: venv
	$(PY) bench/run_all.py
