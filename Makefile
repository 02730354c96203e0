# Quickstart: `make demo` and `make test`. Both create .venv with Python 3.11 if it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,export,mobile]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fxrep.demo

test: $(STAMP)
	$(PY) -m ruff check fxrep tests benchmarks
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check fxrep tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/fuse_time.py

clean:
	rm -rf $(VENV) build *.egg-info
