# Fresh machine:  make demo   (install + run the bundled model)   |   make test   (install + run the test suite)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

.PHONY: setup setup-dev demo test lint space bench

$(VENV)/.deps: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	bash scripts/install_system_deps.sh
	touch $@

$(VENV)/.dev: $(VENV)/.deps requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	bash scripts/install_system_deps.sh --browser
	PYTHON=$(PY) bash scripts/fetch_transformers_tests.sh
	touch $@

setup: $(VENV)/.deps
setup-dev: $(VENV)/.dev

demo: $(VENV)/.deps
	$(PY) demo.py

test: $(VENV)/.dev
	$(PY) -m pytest

lint: $(VENV)/.dev
	$(PY) -m ruff check .

space: $(VENV)/.deps
	$(PY) space/app.py
