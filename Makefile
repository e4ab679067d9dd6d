# fedloom: `make demo` runs a real local federation, `make sim-demo` the default simulator
# scenario, `make test` runs the whole suite.
# Each creates or updates the virtual environment in .venv by itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo sim-demo test lint bench fuzz clean venv wheel-check

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
# The development environment has every extra (sim, torch, dpsgd with privacy, tabular, export, ray, test); a hospital's daemon
# needs only the base install (`make wheel-check` proves it works alone).
# PYTHONWARNINGS: setuptools warns that an editable install may not behave like a regular
# one ("Editable installation" UserWarning) on every install; that one warning is noise here.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	PYTHONWARNINGS="ignore:Editable installation:UserWarning" \
		$(BIN)/pip install --quiet -e '.[sim,torch,dpsgd,tabular,export,ray,test]'
	touch $(STAMP)

venv: $(STAMP)

# A real local federation: root, 2 regions, 6 hospital daemons on 127.0.0.1 (< 2 minutes).
demo: $(STAMP)
	$(BIN)/fedloom demo

# The default scenario in the simulator (report, CSV series and plots in runs/demo).
sim-demo: $(STAMP)
	$(BIN)/fedloom sim scenarios/hospitals.toml --out runs/demo

# The suite runs in parallel (pytest-xdist), one worker per core up to 4: most of its time is
# daemons and simulator runs waiting on each other. Each worker picks daemon ports from its
# own range (tests/conftest.py); tests marked xdist_group (the Ray cluster's) share one worker.
# `make test PYTEST_WORKERS=0` runs it in one process.
PYTEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/pytest -n $(PYTEST_WORKERS) --maxprocesses 4 --dist loadgroup
	$(MAKE) --no-print-directory wheel-check

# Build the wheel, install it without extras into a new clean virtual environment
# (build/wheel-check/venv, made afresh each time) and run a root and two sites there over the
# real encrypted transport with a numpy model (about 20 s with a warm pip cache; pip may download the
# base dependencies, through its cache).
wheel-check: $(STAMP)
	$(BIN)/python tests/packaging/wheel_smoke.py --python $(PY) --work build/wheel-check

bench: $(STAMP)
	$(BIN)/python bench/sim_throughput.py

# 1,000,000 hostile inputs through every decoder of peer bytes (about 2-5 minutes here).
fuzz: $(STAMP)
	$(BIN)/python bench/fuzz.py

clean:
	rm -rf runs build .pytest_cache .mypy_cache .ruff_cache
