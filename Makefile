# K2 — every target installs what it needs (venv, Python deps, Debian packages, Maven jars,
# Go-built binaries), caching downloads and builds by version under ~/.cache/k2 (K2_CACHE_DIR).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
K2 := $(BIN)/k2
STAMP := $(VENV)/.k2-installed
PYTEST_ARGS ?=
KUBE ?=
ASX ?= $(firstword $(wildcard ../shared/data/asx-2014-03))

.PHONY: help install demo test test-fast dev-up dev-down bench lint operator kind-up kind-down tilt clean

help:
	@echo "make demo      - the guided tour on embedded defaults (Kafka + registry + SQLite/local Iceberg)"
	@echo "make test      - install, start the real stack, run every test, stop the stack"
	@echo "make dev-up    - start the local stack (KUBE=1 adds etcd + kube-apiserver + controller-manager)"
	@echo "make dev-down  - stop it"
	@echo "make bench     - benchmarks on the ASX sample (results in docs/benchmarks.md)"
	@echo "make lint      - ruff"

$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(K2) demo $(if $(ASX_DEMO),--asx $(ASX_DEMO))

test: $(STAMP)
	bash scripts/test.sh $(PYTEST_ARGS)

dev-up: $(STAMP)
	$(K2) stack up $(if $(KUBE),--kube)

dev-down: $(STAMP)
	$(K2) stack down

bench: $(STAMP)
	bash scripts/bench.sh

lint: $(STAMP)
	$(BIN)/ruff check workloads operator data tests benchmarks

operator: $(STAMP)
	$(K2) operator

clean:
	-$(K2) stack down
	rm -rf .k2 $(VENV)
