# The two commands of the README: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 2

.PHONY: setup setup-test demo demo-tiny test lint typecheck unit

# .venv only: the demo installs nothing else.
setup:
	./scripts/setup.sh

# The test suite's one system package (chromium, for the dashboard tests).
setup-test:
	./scripts/setup-test.sh

demo: setup
	$(VENV)/bin/cotune demo

demo-tiny: setup
	$(VENV)/bin/cotune demo --tiny

lint: setup
	$(VENV)/bin/ruff check cotune services workers tests benchmarks scripts
	$(VENV)/bin/ruff format --check cotune services workers tests benchmarks scripts

typecheck: setup
	$(VENV)/bin/mypy

unit: setup setup-test
	$(VENV)/bin/pytest -q

test: lint typecheck unit
