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

.PHONY: help install demo test test-fast dev-up dev-down bench bench-scale lint operator kind-up kind-api-key kind-down tilt clean

help:
	@echo "make demo      - the guided tour on embedded defaults (Kafka + registry + SQLite/local Iceberg)"
	@echo "make test      - install, start the real stack, run every test, stop the stack"
	@echo "make test-fast - the unit tests: no services, about a minute warm"
	@echo "make dev-up    - start the local stack (KUBE=1 adds etcd + kube-apiserver + controller-manager)"
	@echo "make dev-down  - stop it"
	@echo "make bench     - benchmarks on the ASX sample (results in docs/benchmarks.md)"
	@echo "make bench-scale - the whole path at 1x, 10x, 100x the sample's rows (synthetic; 20-40 minutes on 2 cores)"
	@echo "make lint      - ruff and mypy (types)"

$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)
	@echo "installed into $(VENV): put k2 and k2-query on your PATH with  source $(VENV)/bin/activate"

demo: $(STAMP)
	$(K2) demo $(if $(ASX_DEMO),--asx $(ASX_DEMO))

test: $(STAMP)
	bash scripts/test.sh $(PYTEST_ARGS)

# The quick loop: unit tests only (no services, no helm build), about a minute warm.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit -m "unit and not helm" -q $(PYTEST_ARGS)

dev-up: $(STAMP)
	$(K2) stack up $(if $(KUBE),--kube)

dev-down: $(STAMP)
	$(K2) stack down

bench: $(STAMP)
	bash scripts/bench.sh

bench-scale: $(STAMP)
	bash scripts/bench_scale.sh

# ruff (style, bugs) then mypy (types; config in pyproject.toml, incremental: a few seconds warm)
lint: $(STAMP)
	$(BIN)/ruff check workloads operator data tests benchmarks
	$(BIN)/mypy

operator: $(STAMP)
	$(K2) operator

# kind / Tilt: the Docker engine (started on demand as root), kind and the node image are built
# here (k2.stack.docker, k2.stack.kindnode; no registry needed); helm by k2.stack.helm. docs/operations.md
KIND_CLUSTER ?= k2
KCTX = kind-$(KIND_CLUSTER)
KUBECTL = $(BIN)/python -m k2.stack.kindnode kubectl

kind-up: $(STAMP)
	$(BIN)/python -m k2.stack.kindcluster up --name $(KIND_CLUSTER)
	$(BIN)/python -m k2.stack.images build
	$(BIN)/python -m k2.stack.kindcluster load --name $(KIND_CLUSTER) $$($(BIN)/python -m k2.stack.images list)
	$(BIN)/python -m k2.stack.addons --kube-context $(KCTX)
	@$(MAKE) --no-print-directory kind-api-key
	$$($(KUBECTL)) --context $(KCTX) label namespace k2 pod-security.kubernetes.io/enforce=restricted --overwrite
	# With the ASX sample beside the checkout the samples read it (the nodes mount it); else synthetic ticks.
	$(if $(ASX),$$($(KUBECTL)) --context $(KCTX) apply -f manifests/kind-data/asx-sample.yaml)
	$$($(BIN)/python -m k2.stack.helm) upgrade --install k2 charts/k2 --kube-context $(KCTX) -n k2 \
		-f charts/k2/ci/kind-values.yaml $(if $(ASX),-f charts/k2/ci/kind-asx-values.yaml) --wait --timeout 15m
	$$($(KUBECTL)) --context $(KCTX) apply -f manifests/kind-data/live-feed.yaml
	$$($(KUBECTL)) --context $(KCTX) -n k2 wait --for=condition=Ready --all ingestionpipelines,icebergtables,queryservices --timeout=20m
	@echo "API: http://k2.localtest.me/docs (or curl -H 'Host: k2.localtest.me' -H \"X-API-Key: \$$K2_API_KEY\" http://127.0.0.1/v1/symbols, with the key printed above)  Prometheus: kubectl --context $(KCTX) -n monitoring port-forward svc/prometheus-operated 9091:9090"

# A new API key for the QueryServices on kind (Secret k2-api-keys): the cluster stores only its
# digest, the key is printed once. Each run replaces the key (rotation: the old one stops working).
kind-api-key: $(STAMP)
	$$($(KUBECTL)) --context $(KCTX) create namespace k2 --dry-run=client -o yaml | $$($(KUBECTL)) --context $(KCTX) apply -f -
	@entry=$$(mktemp) && trap 'rm -f "$$entry"' EXIT && \
	key=$$($(K2) api-key --id kind --stream 2>"$$entry") && \
	$$($(KUBECTL)) --context $(KCTX) -n k2 create secret generic k2-api-keys --from-file=api_keys="$$entry" \
		--dry-run=client -o yaml | $$($(KUBECTL)) --context $(KCTX) apply -f - && \
	echo "API key (shown once; the cluster stores only its digest):  export K2_API_KEY=$$key"

# Deletes the kind cluster, and stops the Docker engine if K2 started it and no kind cluster is left
# (its images stay cached under ~/.cache/k2/docker).
kind-down: $(STAMP)
	$(BIN)/python -m k2.stack.kindcluster down --name $(KIND_CLUSTER)

tilt: $(STAMP)
	$(BIN)/python -m k2.stack.kindcluster up --name $(KIND_CLUSTER)
	@$$($(KUBECTL)) --context $(KCTX) -n k2 get secret k2-api-keys >/dev/null 2>&1 || $(MAKE) --no-print-directory kind-api-key
	$$($(KUBECTL)) config use-context $(KCTX)
	tilt up

clean:
	-$(K2) stack down
	rm -rf .k2 $(VENV)
