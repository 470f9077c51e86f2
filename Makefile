# Two commands matter: `make demo` and `make test`. Both set up what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: setup demo test lint clean

setup: $(STAMP)

# Rebuilt only when the package metadata changes; torch is pinned to the CPU build on disk.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/safedistill run opsa --model smollm2-135m-instruct --out $(DEMO_OUT) --resume

test: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q -m "not integration"
	$(BIN)/pytest -q -m integration

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf $(VENV) runs
