# The README's two commands: `make repro` (the whole pipeline) and `make test` (the tests).
# Both set everything up first; nothing else is needed by hand on Debian with Python 3.11.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.setup-stamp
FASHION_MNIST := /usr/share/datasets/fashion-mnist
UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000
export PATH := $(BIN):$(PATH)

.PHONY: setup repro test lint ui dashboard clean

setup: $(STAMP) fashion-mnist

# Keyed on pyproject.toml: a second `make setup` with nothing changed does nothing.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# -qq: this machine's pip config lists local indexes that print a warning per package.
	$(BIN)/python -m pip install -qq -e '.[dev]'
	touch $@

.PHONY: fashion-mnist
fashion-mnist:
	@if [ -d $(FASHION_MNIST) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's dataset-fashion-mnist into $(FASHION_MNIST)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
	  echo "note: apt-get is not available; put the Fashion-MNIST IDX files in data/raw/fashion-mnist/"; \
	fi

# PostgreSQL's server binaries (Debian's `postgresql`), for the tests of Optuna and MLflow on
# a database server: tests/services.py starts a throwaway server on 127.0.0.1 from them.
.PHONY: postgresql
postgresql:
	@if ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's postgresql (server binaries for the tests)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; \
	else \
	  echo "note: apt-get is not available; install PostgreSQL for the database tests"; \
	fi

# Debian's headless Chromium and its chromedriver, for tests/system/test_browser.py, which
# opens reports/index.html in it (selenium drives it; no network needed).
.PHONY: chromium
chromium:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium and chromium-driver (headless browser for the tests)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
	  echo "note: apt-get is not available; install Chromium and chromedriver for the browser test"; \
	fi

repro: setup
	$(BIN)/dvc repro

# Also the transfer-learning pipeline (transfer/dvc.yaml: pretrain, finetune) and the
# optimizer comparison (compare/dvc.yaml), which do not fit `make repro`'s time budget; they
# write transfer/report.md and compare/report.md.
.PHONY: repro-full
repro-full: repro
	$(BIN)/dvc repro transfer/dvc.yaml
	$(BIN)/dvc repro compare/dvc.yaml

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# The tests in PYTEST_WORKERS processes (pytest-xdist); PYTEST_WORKERS=0 runs them in this one.
# worksteal: a worker that runs out of tests takes some of the other's (a few tests take
# minutes, and load's up-front split can leave one worker idle at the end).
PYTEST_WORKERS ?= 2

# lint (CPU) runs beside the system packages' apt-get (network, disk): they do not wait for
# each other. The two apt-get installs stay one after the other (one dpkg lock).
test: setup
	$(MAKE) --no-print-directory -j2 lint system-packages
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist worksteal

.PHONY: system-packages
system-packages:
	$(MAKE) --no-print-directory postgresql
	$(MAKE) --no-print-directory chromium

# The report as one page (make repro writes it): its path, and the desktop's browser on it.
.PHONY: report-open
report-open:
	@test -f reports/index.html || { echo "reports/index.html is missing: run make repro"; exit 1; }
	@echo "$(CURDIR)/reports/index.html"
	@xdg-open reports/index.html >/dev/null 2>&1 || $(BIN)/python -m webbrowser -t "file://$(CURDIR)/reports/index.html" >/dev/null 2>&1 || true

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host $(UI_HOST) --port $(UI_PORT)

# A tracking server for runs from other machines (MLFLOW_TRACKING_URI=http://HOST:PORT):
# the same sqlite store as the local runs (or MLFLOW_BACKEND_STORE=postgresql://...), and
# artifacts uploaded through the server into MLFLOW_ARTIFACTS. Loopback only unless
# MLFLOW_HOST says otherwise (then also pass --allowed-hosts via MLFLOW_SERVER_OPTS).
# MLflow's job runner (GenAI jobs, a dozen extra processes) is off unless MLFLOW_JOBS=true.
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_BACKEND_STORE ?= sqlite:///$(CURDIR)/mlruns/mlflow.db
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlruns/artifacts
MLFLOW_SERVER_OPTS ?= --workers 1
MLFLOW_JOBS ?= false

.PHONY: mlflow-server
mlflow-server: $(STAMP)
	mkdir -p $(MLFLOW_ARTIFACTS)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$(MLFLOW_JOBS) exec $(BIN)/mlflow server \
	  --backend-store-uri $(MLFLOW_BACKEND_STORE) \
	  --artifacts-destination $(MLFLOW_ARTIFACTS) --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
	  $(MLFLOW_SERVER_OPTS)

clean:
	rm -rf data/prepared models metrics plots reports summary.json params checkpoints
	rm -rf figures lr_find dvc_plots
	rm -rf transfer/models transfer/metrics transfer/report.md transfer/accuracy_vs_size.png
	rm -rf compare/runs compare/best compare/studies.json compare/report.md compare/profile.png
	rm -f compare/metrics.json
