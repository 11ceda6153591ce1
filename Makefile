# moe-router-operator: `make demo` runs the product end to end on embedded defaults,
# `make test` installs what it needs and runs lint, type checks and the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := operator,runtime,plot,dev

.PHONY: help venv system-deps lint typecheck test unit integration demo e2e crd bench clean

help:
	@echo "make demo   - run the operator, runtime and simulator end to end in a local sandbox"
	@echo "make test   - install everything and run lint, mypy and the test suite"
	@echo "make e2e    - end-to-end tests against a kind cluster (needs docker and kind)"
	@echo "make crd    - regenerate crds/, the chart CRD copy and docs/configuration.md from the models"
	@echo "make bench  - run the benchmarks in benchmarks/"

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

# The real Prometheus and promtool (Debian's package) for the scaling and alert-rule tests.
system-deps:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "prometheus/promtool missing: run 'sudo apt-get install prometheus' (tests that need it will skip)"; \
	  fi; \
	fi

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

typecheck: lint

test: venv system-deps lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

unit: venv
	$(BIN)/python -m pytest -q tests/unit

integration: venv system-deps
	$(BIN)/python -m pytest -q tests/integration

e2e: venv
	$(BIN)/python -m pytest -q -m e2e tests/e2e

demo: venv
	$(BIN)/python -m moe_operator.demo

crd: venv
	$(BIN)/moe-operator crd > crds/moerouter.io_moerouters.yaml
	cp crds/moerouter.io_moerouters.yaml charts/moe-router-operator/crds/moerouter.io_moerouters.yaml
	cp crds/moerouter.io_moerouters.yaml config/crd/bases/moerouter.io_moerouters.yaml
	$(BIN)/python -m moe_operator.reference > docs/configuration.md

bench: venv
	$(BIN)/python benchmarks/operator_scale.py
	$(BIN)/python benchmarks/router_throughput.py
	$(BIN)/python benchmarks/scaling.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
