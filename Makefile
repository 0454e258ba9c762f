# The two commands of the README: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo demo-tiny test lint typecheck unit

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/bin/cotune demo

demo-tiny: setup
	$(VENV)/bin/cotune demo --tiny

lint: setup
	$(VENV)/bin/ruff check cotune services workers tests benchmarks
	$(VENV)/bin/ruff format --check cotune services workers tests benchmarks

typecheck: setup
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/pytest -q

test: lint typecheck unit
