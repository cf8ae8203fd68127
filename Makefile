# One command to set up and run the demo, one to set up and run the tests. Both create .venv themselves.
VENV := .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup data clean

demo: setup data
	$(VENV)/bin/spot-compile demo

test: setup data
	$(PY) -m pytest -q

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

clean:
	rm -rf $(VENV) *.egg-info
