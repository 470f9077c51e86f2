# Two commands matter: `make demo` and `make test`. Both set up what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: setup demo test lint clean

setup: $(STAMP)

# Rebuilt only when the package metadata changes; torch is pinned to the CPU build on disk, which
# pip's find-links setting (its config or PIP_FIND_LINKS) points to. uv (from PyPI) installs the
# same versions pip resolves, in one call with parallel downloads and no bytecode compilation of
# the ~13.7k files: ~14 s where three pip calls took ~65 s (docs/performance.md). --system-certs:
# uv reads the platform's certificate store, as pip does here (uv's own roots alone fail behind a
# TLS-inspecting proxy unless SSL_CERT_FILE is set).
FIND_LINKS = $$(for d in $${PIP_FIND_LINKS:-} $$($(BIN)/pip config get global.find-links 2>/dev/null); do echo "$$d"; done | sort -u | sed 's/^/--find-links /')

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile uv==0.13.10
	$(BIN)/uv pip install --quiet --system-certs --python $(BIN)/python $(FIND_LINKS) --upgrade-package pip pip torch==2.13.0 -e '.[dev]'
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
