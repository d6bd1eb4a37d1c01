# The two commands of the README: `make demo` and `make test`. Both set up what they need first,
# idempotently: system packages (as root on Debian/Ubuntu), a .venv with the Python dependencies.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed
# torch is pinned to the CPU build that installs from local disk; it goes in first so that nothing
# else pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
EXTRAS := spark,ray,operators,dev,bench
PYTEST_ARGS ?=

.PHONY: help demo test deps system-deps bench-ingest bench-etl bench-quality bench-train bench-score bench-serve bench-sync diagrams bench-report clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

demo: deps  ## run the job end to end on the local stack (moto, redis-server, PostgreSQL)
	$(VENV)/bin/streamrec demo

test: deps  ## run the whole test suite (unit, integration, charts, e2e)
	$(PY) -m pytest $(PYTEST_ARGS)

bench-ingest: deps  ## consumer throughput against the decode-only baseline
	$(PY) -m benchmarks.ingest

bench-etl: deps  ## Spark ETL throughput against DuckDB on the same raw Parquet
	$(PY) -m benchmarks.etl

MOVIELENS ?= ../shared/datasets/movielens-100k
bench-quality: deps  ## two-tower vs most-popular vs ALS quality (with MovieLens when MOVIELENS/u.data exists)
	$(PY) -m benchmarks.quality $(if $(wildcard $(MOVIELENS)/u.data),--movielens $(MOVIELENS))

bench-train: deps  ## Ray Train samples/s against a plain PyTorch loop
	$(PY) -m benchmarks.train

bench-score: deps  ## Ray Data scoring users/s against raw index search
	$(PY) -m benchmarks.score

bench-serve: deps  ## Ray Serve latency and throughput against a plain FastAPI + Redis GET app
	$(PY) -m benchmarks.serve

bench-sync: deps  ## DynamoDB sync items/s (and backoff share under throttling) against a sequential BatchWriteItem loop
	$(PY) -m benchmarks.sync

# The docs extra (diagrams, matplotlib) is installed on demand: `make test` and CI never need Graphviz.
diagrams: $(STAMP)  ## regenerate the design diagrams (docs/diagrams/*.png) from their Python sources
	@if ! command -v dot >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing graphviz (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null; \
	  else \
	    echo "error: Graphviz (dot) is missing; install it (Debian/Ubuntu: sudo apt-get install -y graphviz)" >&2; exit 1; \
	  fi; \
	fi
	@$(PY) -c 'import diagrams' 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check -e '.[docs]'
	$(PY) docs/diagrams/build.py

bench-report: $(STAMP)  ## regenerate docs/benchmarks.md's figures section and plots from benchmarks/results/*.jsonl
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check -e '.[docs]'
	$(PY) -m benchmarks.report

deps: system-deps $(STAMP)  ## install system packages and the Python environment

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "streamrec needs Python >= 3.11, found " + sys.version.split()[0])'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	@touch $(STAMP)

system-deps:
	@if ! command -v redis-server >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing redis-server (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "error: redis-server is missing; install it (Debian/Ubuntu: sudo apt-get install -y redis-server)" >&2; exit 1; \
	  fi; \
	fi
	@if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "error: PostgreSQL server binaries (initdb, pg_ctl) are missing; install them (Debian/Ubuntu: apt-get install -y postgresql)" >&2; exit 1; \
	fi
	@if ! java -version 2>&1 | grep -Eq 'version "(1[7-9]|2[0-9])'; then \
	  echo "error: Java 17 or newer is required by Spark (Debian/Ubuntu: apt-get install -y openjdk-17-jre-headless)" >&2; exit 1; \
	fi

clean:  ## stop the local stack and remove the venv and local state
	-@test -x $(VENV)/bin/streamrec && $(VENV)/bin/streamrec dev down
	rm -rf $(VENV) .streamrec .pytest_cache
