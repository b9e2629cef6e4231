# crewdb developer commands. `make run` and `make test` work on a fresh machine: both set up
# the virtualenv first.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard protos/crewdb/v1/*.proto)

.PHONY: setup run test test-unit test-integration test-e2e proto proto-check lint format \
        typecheck bench load check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "crewdb needs Python >= 3.11; set PYTHON=python3.11 (or newer)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

run: $(STAMP)
	$(BIN)/crewdb serve

test: $(STAMP)
	$(BIN)/python -m pytest

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration

test-e2e: $(STAMP)
	$(BIN)/python -m pytest tests/e2e

# Generated code lives in crewdb/v1 and is committed; only this target writes it.
define GENERATE
	$(BIN)/python -m grpc_tools.protoc -I protos \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
		--python_out=$(1) --mypy_out=$(1) --grpc_python_out=$(1) --mypy_grpc_out=$(1) \
		$(PROTOS)
endef

proto: $(STAMP)
	rm -f crewdb/v1/*_pb2.py crewdb/v1/*_pb2.pyi crewdb/v1/*_pb2_grpc.py crewdb/v1/*_pb2_grpc.pyi
	$(call GENERATE,.)

proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && $(call GENERATE,$$tmp) && \
		diff -r --exclude=__init__.py --exclude=__pycache__ --exclude=py.typed \
			"$$tmp/crewdb/v1" crewdb/v1 && echo "generated code is up to date"; \
		status=$$?; rm -rf "$$tmp"; \
		[ $$status -eq 0 ] || { echo "crewdb/v1 differs from the protos: run 'make proto'"; exit 1; }

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m tests.bench.run

# A mix of every kind of call from many clients for 30 s on loopback, then a reconciliation of
# the database against every acknowledged write; the figures go to docs/benchmarks.md.
load: $(STAMP)
	$(BIN)/python -m tests.load.run

check: lint typecheck proto-check test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
