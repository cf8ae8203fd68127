# One command to set up and run the demo, one to set up and run the tests. Both create .venv themselves.
VENV := .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The oldest torch spot-compile supports (pyproject's torch>=), found by trying older releases (docs/development.md).
OLDEST_TORCH := 2.6.0
OLDEST_VENV := .venv-oldest-torch
# A quick subset for the oldest torch: capture, every pass against eager, budgets, save/load, bad input and the fuzz.
OLDEST_TESTS := tests/test_prune_pass.py tests/test_find_blocks.py tests/test_trivial_masks.py \
	tests/test_data_artifacts.py tests/test_bad_input.py tests/test_fuzz_api.py

.PHONY: demo test test-oldest-torch setup data clean

demo: setup data
	$(VENV)/bin/spot-compile demo

# Lint, then the oldest torch's subset, then the full suite (last, so that the last summary line is its own).
test: setup data
	$(VENV)/bin/ruff check .
	$(MAKE) --no-print-directory test-oldest-torch
	$(PY) -m pytest -q

test-oldest-torch: $(OLDEST_VENV)/.installed data
	$(OLDEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(OLDEST_TESTS)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# `pip install .` into a venv that already holds the oldest torch must not replace it: checked after the install.
$(OLDEST_VENV)/.installed: pyproject.toml
	python3 -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install --quiet torch==$(OLDEST_TORCH)
	$(OLDEST_VENV)/bin/python -m pip install --quiet . pytest
	$(OLDEST_VENV)/bin/python -c "import torch; v = torch.__version__.split('+')[0]; \
		assert v == '$(OLDEST_TORCH)', f'pip install . replaced torch $(OLDEST_TORCH) with {v}'; print('oldest torch:', v)"
	touch $@

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

clean:
	rm -rf $(VENV) $(OLDEST_VENV) *.egg-info build
