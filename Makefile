# kubegfs — run `make` (or `make help`) to list targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
PYTHON    := $(BIN)/python
STAMP     := $(VENV)/.installed
K8S_CACHE ?= $(HOME)/.cache/kubegfs/k8s
PYTEST_ARGS ?=

.PHONY: help venv run up down test test-core lint lint-chart bench bench-hdfs bench-pods bench-quick chaos \
        controlplane-build prometheus-build helm-docs-build chart-readme controlplane-up controlplane-down images helm-package clean \
        cluster-up cluster-down cluster-images demo-cluster

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sort | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-20s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml devtools/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' -e ./devtools
	touch $(STAMP)

venv: $(STAMP) ## create .venv: kubegfs editable with its dev extra, and devtools/ (kubegfs-dev)

run: $(STAMP) ## the demo: local file system, then Snapshot/Restore CRs through the operator on a real kube-apiserver
	$(BIN)/kubegfs demo
	@echo "== next: the same through Kubernetes; the control-plane binaries are built once into $(K8S_CACHE) (cold: tens of minutes on 2 cores; then cached)"
	bash hack/controlplane/build.sh $(K8S_CACHE)
	PATH=$(abspath $(BIN)):$$PATH KUBEGFS_K8S_BIN=$(K8S_CACHE)/bin $(PYTHON) -m kubegfs_dev.demo

up: $(STAMP) controlplane-build ## like run, then keep everything running and print the KUBECONFIG line (Ctrl-C stops)
	PATH=$(abspath $(BIN)):$$PATH KUBEGFS_K8S_BIN=$(K8S_CACHE)/bin $(PYTHON) -m kubegfs_dev.demo --keep-running

down: ## stop what `make up` or `make controlplane-up` left running (by the PIDs their state dirs record)
	$(PYTHON) -m kubegfs_dev.pids stop .run/k8s/stack/pids.json .run/k8s/controlplane/pids.json \
	  .run/controlplane/pids.json

test: $(STAMP) controlplane-build prometheus-build ## the whole test suite (builds the local control plane if missing)
	KUBEGFS_K8S_BIN=$(K8S_CACHE)/bin PATH=$(abspath $(BIN)):$$PATH \
	  $(BIN)/pytest $(PYTEST_ARGS)

test-core: $(STAMP) ## only the file-system tests (no control plane)
	$(BIN)/pytest -m 'not controlplane' $(PYTEST_ARGS)

lint: $(STAMP) ## ruff (incl. no pickle/marshal/eval/yaml.load), mypy, import contracts (.importlinter)
	$(BIN)/ruff check kubegfs tests operator devtools
	$(BIN)/mypy kubegfs operator/kubegfs_operator devtools/kubegfs_dev
	$(BIN)/lint-imports --no-cache

lint-chart: controlplane-build helm-docs-build ## helm lint --strict of the chart; its README is what helm-docs makes
	$(K8S_CACHE)/bin/helm lint --strict helm/kubegfs
	bash hack/helm-docs/check.sh $(K8S_CACHE)/bin/helm-docs

helm-docs-build: ## build/cache helm-docs from its Go module (the chart README generator)
	bash hack/helm-docs/build.sh $(K8S_CACHE)

chart-readme: helm-docs-build ## regenerate helm/kubegfs/README.md from values.yaml and README.md.gotmpl
	$(K8S_CACHE)/bin/helm-docs --chart-search-root helm --log-level warning

helm-package: controlplane-build ## package the Helm chart (CRDs and operator RBAC synced first) into dist/
	hack/sync-crds.sh
	mkdir -p dist && $(K8S_CACHE)/bin/helm package helm/kubegfs -d dist

TRIALS ?= 20
OPS ?= 40
chaos: $(STAMP) ## seeded random ops + faults against a witness model (make chaos TRIALS=200 [SLOW_FSYNC=1])
	$(PYTHON) -m kubegfs_dev.chaos --trials $(TRIALS) --ops $(OPS) $(if $(SEED),--seed $(SEED)) \
	  $(if $(SLOW_FSYNC),--slow-fsync $(SLOW_FSYNC))

bench: $(STAMP) ## the benchmark suite with the HDFS peer side by side: table on stdout, JSON + PNG under bench-results/
	$(PYTHON) -m kubegfs_dev.bench --hdfs --out bench-results

bench-hdfs: $(STAMP) ## the HDFS peer alone: kubegfs vs an HDFS MiniDFSCluster side by side (Java 17 + Maven; not in bench-quick)
	$(PYTHON) -m kubegfs_dev.bench --only hdfs --out bench-results

bench-pods: $(STAMP) ## the chart on a real 3-node cluster: install, 50 Snapshot CRs, master restart (root; not in bench-quick)
	$(PYTHON) -m kubegfs_dev.bench --only pods --out bench-results

bench-quick: $(STAMP) ## a small benchmark run (CI runs it so the code can't rot)
	$(PYTHON) -m kubegfs_dev.bench --quick --out bench-results

controlplane-build: ## build/cache etcd, kube-apiserver, kube-controller-manager, helm under .cache/k8s
	bash hack/controlplane/build.sh $(K8S_CACHE)

prometheus-build: ## build/cache prometheus+promtool with Kubernetes service discovery (monitoring tests)
	bash hack/prometheus/build.sh $(K8S_CACHE)

controlplane-up: $(STAMP) controlplane-build ## start a long-lived local kube-apiserver+etcd, print the KUBECONFIG line
	KUBEGFS_K8S_BIN=$(K8S_CACHE)/bin $(PYTHON) -m kubegfs_dev.controlplane up --state .run/controlplane

controlplane-down: $(STAMP) ## stop the control plane started by controlplane-up
	$(PYTHON) -m kubegfs_dev.controlplane down --state .run/controlplane

CLUSTER_STATE ?= .run/cluster
VERSION   := $(shell sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -1)
CLUSTER_IMAGES := $(foreach c,master chunkserver operator,localhost/kubegfs/$(c):$(VERSION))

cluster-images: $(STAMP) ## build the kubegfs images with buildah on a debootstrap base (no registry)
	bash hack/images/build.sh --tool buildah --base "$$(bash hack/images/base.sh)" >&2

cluster-up: $(STAMP) controlplane-build cluster-images ## a real 3-node cluster (kubelet+containerd, needs root) with the images loaded; prints the KUBECONFIG line
	KUBEGFS_K8S_BIN=$(K8S_CACHE)/bin $(PYTHON) -m kubegfs_dev.cluster up --state $(CLUSTER_STATE) --images $(CLUSTER_IMAGES)

cluster-down: $(STAMP) ## stop the cluster-up cluster and undo its host changes (idempotent)
	KUBEGFS_K8S_BIN=$(K8S_CACHE)/bin $(PYTHON) -m kubegfs_dev.cluster down --state $(CLUSTER_STATE)

demo-cluster: $(STAMP) controlplane-build cluster-images ## the `make run` story on real nodes: chart install, Snapshot/Restore CRs (root; leaves the cluster up)
	PATH=$(abspath $(BIN)):$$PATH KUBEGFS_K8S_BIN=$(K8S_CACHE)/bin $(PYTHON) -m kubegfs_dev.demo_cluster

images: ## build the master, chunkserver and operator images (REGISTRY=… also pushes; IMAGES_ARGS=--base …)
	REGISTRY=$(REGISTRY) bash hack/images/build.sh $(if $(REGISTRY),--push) $(IMAGES_ARGS)

clean: ## remove venv, caches and run data (keeps the control-plane binaries in $$HOME/.cache/kubegfs)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .data .run bench-results build *.egg-info devtools/*.egg-info devtools/hdfs-peer/target
