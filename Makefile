# Two commands do all the set-up on a fresh machine:
#   make demo   # venv + install + convert a built-in checkpoint, proving parity and exporting
#   make test   # venv + install + the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := tf-cpu,timm,export,data,jax,dev

.PHONY: install demo test test-slow test-all bench clean

$(STAMP): setup.cfg pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m weights_converter --demo --output demo_out --force

test: install
	$(PY) -m pytest -m "not slow"

test-slow: install
	$(PY) -m pytest -m slow

test-all: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) demo_out .pytest_cache
