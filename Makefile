# The README's two commands: `make run` and `make test`. Both create the environment if it
# is missing and install the pinned set (constraints.txt) first, with the torch build the
# machine can use (D2D_TORCH below).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch: the CUDA build of the pinned version where an NVIDIA driver answers (`nvidia-smi -L`),
# the CPU build (constraints.txt's +cpu) elsewhere; `make install D2D_TORCH=cuda` (or cpu) decides
# instead. The CUDA build is PyPI's plain torch wheel of the same version, with its CUDA
# libraries as dependencies; nothing else in the pinned set changes. A CPU build already in the
# venv would satisfy `torch==VERSION` too, so it is removed first, and the install ends by
# checking that torch really is a CUDA build (a pip configuration that offers +cpu wheels,
# an index or find-links, would be preferred by pip: that is an error, not a silent CPU install).
ifndef D2D_TORCH
D2D_TORCH := $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
endif
CUDA_CHECK := import sys, torch; sys.exit(0 if torch.version.cuda else f"torch {torch.__version__} is a CPU build: the pip configuration offers +cpu wheels (an index or find-links) before the CUDA build on PyPI; remove them, or install with D2D_TORCH=cpu")
ifeq ($(filter $(D2D_TORCH),cpu cuda),)
$(error D2D_TORCH=$(D2D_TORCH): expected cpu or cuda)
endif
CONSTRAINTS := $(if $(filter cuda,$(D2D_TORCH)),$(VENV)/constraints-cuda.txt,constraints.txt)
STAMP := $(VENV)/.installed-$(D2D_TORCH)
RAW := data/raw/digits.csv
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1

.PHONY: run test unit integration team-test install system-deps data repro ui serve monitor clean-outputs

# PostgreSQL from Debian's packages: the tests run `mlflow server` on it, as a team would.
# Installed only when missing; the tests start and stop their own server as the postgres user.
PG_INITDB := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb))
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
ifeq ($(PG_INITDB),)
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends postgresql >/dev/null
endif

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
ifeq ($(D2D_TORCH),cuda)
	sed 's/^torch==\(.*\)+cpu$$/torch==\1/' constraints.txt > $(CONSTRAINTS)
	$(BIN)/python -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null || $(BIN)/pip uninstall -q -y torch
endif
	set -o pipefail; $(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev]' 2>&1 | { grep -v "^WARNING: Location" || true; }
ifeq ($(D2D_TORCH),cuda)
	$(BIN)/python -c '$(CUDA_CHECK)'
endif
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# The demo data is generated, not downloaded; the generator is deterministic, so the file
# has exactly the md5 that data/raw/digits.csv.dvc records.
$(RAW): | $(STAMP)
	$(BIN)/d2d data demo

data: $(RAW)

run: $(STAMP) $(RAW)
	$(BIN)/d2d run

# The unit tests in two processes (pytest-xdist): they are independent, mostly one core
# each, and took 356 s in one process, 242 s in two, on this 2-core machine. The integration
# tests stay one at a time: each already runs Ray's workers on every core, and servers with
# start-up deadlines.
test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -n 2 tests/unit
	$(BIN)/python -m pytest -q tests/integration

unit: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests/unit

integration: $(STAMP) system-deps
	$(BIN)/python -m pytest -q tests/integration

# team mode on real loopback servers (infra/README.md); `make test` runs it too
team-test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -m team

repro: $(STAMP) $(RAW)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

# the champion over HTTP on 127.0.0.1:8000, and one pass of the drift monitor over data/inbox/
serve: $(STAMP)
	$(BIN)/d2d serve

monitor: $(STAMP)
	$(BIN)/d2d monitor

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000
