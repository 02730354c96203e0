# Quickstart: `make demo` and `make test`. Both create .venv with Python 3.11 if it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-kernels fuzz lint bench clean

# the tests whose numbers depend on the CPU's kernels, run again with other kernel sets than this machine's
# (docs/numerics.md): what one CPU rounds differently must still pass on another
NUMERICS_TESTS := tests/test_golden_code.py tests/test_ir.py tests/test_algebra.py tests/test_numerics.py \
	tests/test_mlp_fusion.py tests/test_attention_fusion.py tests/test_masks.py tests/test_cost.py

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

test-kernels: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest $(NUMERICS_TESTS)
	ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest $(NUMERICS_TESTS)

fuzz: $(STAMP)
	FXREP_HYPOTHESIS_PROFILE=thorough $(PY) -m pytest tests/test_fuzz.py tests/test_reliability.py \
		tests/test_algebra.py tests/test_spellings.py

lint: $(STAMP)
	$(PY) -m ruff check fxrep tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/fuse_time.py

clean:
	rm -rf $(VENV) build *.egg-info
