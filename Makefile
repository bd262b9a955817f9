# One way to set up, run, lint, test and benchmark unblock. The README and CI call these.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Tests use this server when reachable, else an embedded PostgreSQL (pgserver).
export UNBLOCK_TEST_DATABASE_URL ?=

.PHONY: install dev test lint fmt typecheck check bench chaos openapi clients screenshots clean

# The service with its dev tools, and the Mosaic sandbox (a distribution of its own, in sandbox/,
# that `pip install unblock` never brings); both editable. Redone when either pyproject changes.
$(BIN)/unblock: pyproject.toml sandbox/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ./sandbox -e '.[dev]'
	@touch $@

install: $(BIN)/unblock

dev: install  ## embedded Postgres + sandbox + service + demo data
	$(BIN)/unblock dev

test: install  ## the whole suite, in parallel
	$(BIN)/python -m pytest -n auto -p no:cacheprovider $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install
	$(BIN)/mypy

check: lint typecheck test

screenshots: install  ## the web app's browser tests, saving each step to docs/screenshots/
	UNBLOCK_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest -p no:cacheprovider -q tests/test_web_app.py

bench: install  ## ratios against baselines measured in the same run; BENCH_ARGS="--only p3"
	@command -v wrk >/dev/null || echo "bench: wrk not found (Debian: apt-get install wrk);" \
		"the goals fall back to bench/loadgen.py, which caps the fastest baselines"
	$(BIN)/python -m bench $(BENCH_ARGS)

chaos: install  ## the chaos suite, short; CHAOS_FLOWS=1000 CHAOS_SEED=N for the release check
	$(BIN)/python -m bench.chaos $(if $(CHAOS_FLOWS),--flows $(CHAOS_FLOWS)) \
		$(if $(CHAOS_SEED),--seed $(CHAOS_SEED)) $(CHAOS_ARGS)

openapi: install  ## refresh the committed OpenAPI document
	$(BIN)/unblock openapi > openapi/openapi.json

# TypeScript types + strict sample + redocly lint, and the generator that
# tests/test_generated_clients.py uses (in its own venv: it pins its own tools).
clients: install  ## check openapi/openapi.json as generated clients use it
	cd clients/ts && npm ci --no-audit --no-fund && npm run check
	$(PYTHON) -m venv .venv-clients
	.venv-clients/bin/pip install -q -r clients/python/requirements.txt

clean:
	rm -rf $(VENV) .venv-clients clients/ts/node_modules clients/ts/generated .unblock .pytest_cache .ruff_cache .mypy_cache
