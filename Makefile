# qwen-grpc — every entry point a user or CI needs.
#   make run    set up, fetch the model, serve on :50051
#   make test   set up, fetch the model, run every test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# Tests and the default model never touch a model hub.
export HF_HUB_OFFLINE ?= 1
PYTEST_ARGS ?=

.PHONY: help setup model run test test-fast proto lock clean

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Pinned install: requirements.lock holds exact versions (torch==2.13.0 CPU).
$(VENV)/.installed: $(BIN)/activate requirements.lock pyproject.toml
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed  ## create .venv/ with pinned deps and the package (editable)

model: setup  ## fetch + verify + convert the default model (idempotent, cached in ~/.cache/qwen-grpc)
	$(BIN)/qwen-fetch-model

run: model  ## serve the default model (gRPC :50051); pass flags with ARGS="..."
	$(BIN)/qwen-serve $(ARGS)

test: model  ## every test (unit, integration, real model)
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: setup  ## tests that need no real model
	$(BIN)/pytest -m "not real_model" $(PYTEST_ARGS)

proto: setup  ## regenerate service/pb from proto/ (committed; a test checks they match)
	$(PY) proto/generate.py

lock: setup  ## refresh requirements.lock from the current venv
	$(BIN)/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' > requirements.lock

clean:  ## remove the venv and caches (not the model cache)
	rm -rf $(VENV) .pytest_cache
