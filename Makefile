# The front door. `make demo` and `make test` are the two commands a new user needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: help venv demo test test-fast lint typecheck clean
.PHONY: up down ps logs scale-workers dashboards
.PHONY: bench bench-quick
.PHONY: load scale-experiment
.PHONY: chaos chaos-quick

help:
	@echo "make demo   - replay the seed's 1 -> 4 workers scaling live (embedded PostgreSQL, no Docker)"
	@echo "make test   - lint, type-check and run the test suite against real PostgreSQL"
	@echo "make lint   - ruff, mypy --strict, and the dependency rule between layers (import-linter)"
	@echo "make bench  - throughput/latency vs raw psycopg, eventsourcing, Message DB (bench/results/latest.md)"
	@echo "make bench-quick - the same on small sizes, no thresholds (a smoke test, under 2 minutes)"
	@echo "make load   - headless Locust against the API (LOAD_* env; reports in loadtest/out/, exit 1 past thresholds)"
	@echo "make scale-experiment - add/remove workers under steady load; results in docs/results/"
	@echo "make chaos  - fault injection under load: kill -9, DB restart, dropped connections, ... (docs/results/chaos.md)"
	@echo "make up     - the full stack in Docker: PostgreSQL, API, 4 workers, Prometheus, Grafana, traces"
	@echo "make down / ps / logs [SERVICE=worker-0] / scale-workers N=... / dashboards"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

demo: venv
	$(BIN)/projectionist demo

lint: venv
	$(BIN)/ruff check services tests dashboards bench examples loadtest chaos experiments
	$(BIN)/ruff format --check services tests dashboards bench examples loadtest chaos experiments
	$(BIN)/mypy
	$(BIN)/mypy --strict dashboards
	$(BIN)/mypy --strict loadtest
	$(BIN)/mypy --strict chaos
	$(BIN)/mypy --strict experiments
	$(BIN)/lint-imports --no-cache

test: venv lint
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

# Extra arguments: make load ARGS="--target db --shape step"; see `python -m experiments.load -h`.
load: venv
	$(BIN)/python -m experiments.load $(ARGS)

# About 3 minutes; ARGS="--step-seconds 30 --rate 3000 --distribution zipf" etc.
scale-experiment: venv
	$(BIN)/python -m experiments.scale $(ARGS)

# The fault-injection suite (chaos/), about 4 minutes; exit 1 if a scenario fails.
# ARGS="--scenario 'kill -9'" runs one. CI runs the trimmed timings: tests/test_chaos.py.
chaos: venv
	$(BIN)/python -m chaos --output docs/results/chaos.md $(ARGS)

chaos-quick: venv
	$(BIN)/python -m chaos --quick $(ARGS)

clean:
	rm -rf .projectionist .pytest_cache .mypy_cache .ruff_cache

# --- The Docker stack (compose/). Needs Docker with the compose plugin. ----------
COMPOSE ?= docker compose -f compose/docker-compose.yml
SERVICE ?=

compose/.env:
	cp compose/.env.example compose/.env
	@echo "created compose/.env from compose/.env.example: change its passwords for anything but a laptop"

up: compose/.env
	$(COMPOSE) up --detach --build
	@./compose/print-urls.sh

down: compose/.env
	$(COMPOSE) --profile load down

ps: compose/.env
	$(COMPOSE) --profile load ps

logs: compose/.env
	$(COMPOSE) --profile load logs --follow --tail=100 $(SERVICE)

scale-workers: compose/.env
	@test -n "$(N)" || { echo "usage: make scale-workers N=<processes> (0 = none, 4 = one per partition, more = standbys)"; exit 2; }
	COMPOSE="$(COMPOSE)" ./compose/scale-workers.sh $(N)

dashboards: venv
	$(BIN)/python -m dashboards
	$(BIN)/python -m dashboards.manifests

# --- Benchmarks (bench/). The peers come from the `bench` extra and from npm. ----
BENCH_STAMP := $(VENV)/.bench-installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	@rm -f $(VENV)/.bench-installed-*
	@touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench --quick
