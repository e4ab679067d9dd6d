# fedloom: `make demo` runs a real local federation, `make sim-demo` the default simulator
# scenario, `make test` runs the whole suite.
# Each creates or updates the virtual environment in .venv by itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo sim-demo test lint bench fuzz clean venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,runtime]'
	touch $(STAMP)

venv: $(STAMP)

# A real local federation: root, 2 regions, 6 hospital daemons on 127.0.0.1 (< 2 minutes).
demo: $(STAMP)
	$(BIN)/fedloom demo

# The default scenario in the simulator (report, CSV series and plots in runs/demo).
sim-demo: $(STAMP)
	$(BIN)/fedloom sim scenarios/hospitals.toml --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/sim_throughput.py

# 1,000,000 hostile inputs through every decoder of peer bytes (about 2-5 minutes here).
fuzz: $(STAMP)
	$(BIN)/python bench/fuzz.py

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
