# Two commands do all the set-up on a fresh machine:
#   make demo   # venv + install + convert a built-in checkpoint, proving parity and exporting
#   make test   # venv + install + the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := tf-cpu,timm,export,mobile,data,jax,notebooks,dev

.PHONY: install demo lint test test-slow test-all clean

$(STAMP): setup.cfg pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

# The main job on a built-in default: a convmixer_768_32 checkpoint in the paper's
# nn.Sequential layout (random weights, random BatchNorm statistics) is written, then
# converted, proven against timm's model, and exported.
demo: install
	$(PY) -m weights_converter.demo demo/convmixer_768_32.pth
	$(PY) -m weights_converter --torch-ckpt demo/convmixer_768_32.pth --export all --calibration-count 8 --force

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

# The fast suite on two worker processes (pytest-xdist): most of its time is spent in
# single-threaded work (imports, tracing, conversions) that two cores halve.
test: install lint
	$(PY) -m pytest -m "not slow" -n 2

test-slow: install
	$(PY) -m pytest -m slow

test-all: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) demo .pytest_cache
