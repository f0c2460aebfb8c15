# The README's two commands: `make run` and `make test`. Both create the environment if it
# is missing and install the pinned set (constraints.txt) first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RAW := data/raw/digits.csv
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1

.PHONY: run test unit integration install data repro ui clean-outputs

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	set -o pipefail; $(BIN)/pip install -q -c constraints.txt -e '.[dev]' 2>&1 | grep -v "^WARNING: Location"
	touch $(STAMP)

install: $(STAMP)

# The demo data is generated, not downloaded; the generator is deterministic, so the file
# has exactly the md5 that data/raw/digits.csv.dvc records.
$(RAW): | $(STAMP)
	$(BIN)/d2d data demo

data: $(RAW)

run: $(STAMP) $(RAW)
	$(BIN)/d2d run

test: $(STAMP)
	$(BIN)/python -m pytest -q

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

repro: $(STAMP) $(RAW)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000
