# imgsim: `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.imgsim-installed
# The embedded default's environment (Airflow home, DAG folder, spark_default, Spark paths).
ENV = eval "$$($(VENV)/bin/imgsim env)"
PYTEST_ARGS ?=
# `make test` runs the suite in this many processes, one test file per process at a time
# (pytest-xdist), slowest files first (tests/conftest.py). It saves about a fifth, not a half:
# the slow tests use the CPU too (README, measured figures).
TEST_WORKERS ?= 2

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): requirements.lock pyproject.toml
	@command -v java >/dev/null || { echo "installing Java 17 (Spark needs it)"; \
	  apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP) ## create .venv from requirements.lock (pinned) and install imgsim into it

browser-deps: ## Chromium and chromedriver (the browser test; only `make test` needs them)
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { echo "installing Chromium and chromedriver (browser tests)"; \
	  apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }

scaleout-deps: ## PostgreSQL, Redis and docker-compose (the scale-out tests; only `make test`)
	@{ command -v redis-server && command -v docker-compose && { command -v pg_ctl || ls /usr/lib/postgresql/*/bin/pg_ctl; }; } >/dev/null 2>&1 || \
	  { echo "installing PostgreSQL, Redis and docker-compose (scale-out tests)"; \
	  apt-get update -qq && apt-get install -y -qq postgresql redis-server docker-compose; }

demo: $(STAMP) ## set up, then index the offline demo archive (or IMGSIM_ARCHIVE_URL) and print the summary
	$(VENV)/bin/imgsim demo

test: $(STAMP) browser-deps scaleout-deps ## set up, then run the whole test suite (every marker), TEST_WORKERS files at a time
	$(ENV) && $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-fast: $(STAMP) ## the fast tests only (no slow, spark, airflow or browser markers)
	$(ENV) && $(PY) -m pytest -m "not slow and not spark and not airflow and not browser" $(PYTEST_ARGS)

format: $(STAMP) ## ruff format and ruff's safe fixes (import order), in place
	$(VENV)/bin/ruff format include spark_jobs dags plugins tests benchmarks
	$(VENV)/bin/ruff check --fix-only -q include spark_jobs dags plugins tests benchmarks

lint: $(STAMP) ## ruff (lint and format check), mypy and the import layers (import-linter)
	$(VENV)/bin/ruff check include spark_jobs dags plugins tests benchmarks
	$(VENV)/bin/ruff format --check include spark_jobs dags plugins tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

airflow: $(STAMP) ## start the Airflow UI (standalone) on http://127.0.0.1:8080 with the DAGs loaded
	@$(ENV) && airflow db migrate >/dev/null && \
	  echo "Airflow UI: http://127.0.0.1:8080  user: admin  password: see $$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated" && \
	  exec airflow standalone

versions: $(STAMP) ## list the published model versions
	$(VENV)/bin/imgsim versions

BENCH_ARGS ?=
bench: $(STAMP) ## run every benchmark and rebuild benchmarks/README.md from their results
	$(ENV) && for b in quality training embedding incremental lsh search latency duplicates graph; do \
	  echo "== benchmarks/bench_$$b.py"; $(PY) benchmarks/bench_$$b.py $(BENCH_ARGS); done
	$(ENV) && $(PY) benchmarks/bench_duplicates.py --set train
	$(MAKE) bench-map
	$(PY) benchmarks/report.py

# the 8,144 training photos indexed as a user would (imgsim demo), then their map measured
MAP_ROOT ?= test-output/bench/k8
SHARED_DATA ?= ../shared/data
bench-map: $(STAMP) ## index the 8,144 training photos (into MAP_ROOT) and measure their map
	$(ENV) && export IMGSIM_DATA_ROOT=$(abspath $(MAP_ROOT))/data AIRFLOW_HOME=$(abspath $(MAP_ROOT))/airflow \
	  IMGSIM_ARCHIVE_URL=$(abspath $(SHARED_DATA))/stanford_cars_train/cars_train.tgz \
	  IMGSIM_LABELS_URL=$(abspath $(SHARED_DATA))/stanford_cars_labels/cardatasettrain.csv \
	  IMGSIM_CLASS_NAMES_URL=$(abspath $(SHARED_DATA))/stanford_cars_labels/cars_meta.mat && \
	  $(VENV)/bin/imgsim demo && $(PY) benchmarks/bench_map.py --data-root $$IMGSIM_DATA_ROOT

lock: ## re-freeze requirements.lock from the current .venv
	$(PY) -m pip freeze --all --exclude-editable | grep -v '^imgsim' > requirements.lock

clean-data: ## delete the local data root and Airflow home (keeps .venv)
	rm -rf data .airflow

clean: clean-data ## also delete .venv
	rm -rf $(VENV)

.PHONY: bench-map help install browser-deps scaleout-deps demo test test-fast lint airflow versions bench lock clean-data clean
