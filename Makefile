# Two commands do all the set-up on a fresh machine:
#   make demo   # venv + install + convert the released weights (offline: seeded ones), prove
#               # parity, export, classify a photo
#   make test   # venv + install + the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := tf-cpu,timm,export,mobile,data,jax,notebooks,dev

MEDIAPIPE := node_modules/@mediapipe/tasks-vision/package.json

.PHONY: install demo lint test test-slow test-all wheel clean

$(STAMP): setup.cfg setup.py pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

# MediaPipe Tasks for Web, which python -m convmixer_tf.web serves (package-lock.json pins it).
$(MEDIAPIPE): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(MEDIAPIPE)

install: $(STAMP) $(MEDIAPIPE)

# The wheel in dist/: setup.py copies MediaPipe Tasks for Web from node_modules/ into it, so
# `convmixer-web` serves the page with no repository (`pip install 'dist/...whl[web]'`).
wheel: $(STAMP) $(MEDIAPIPE)
	$(PY) -m pip wheel . --no-deps -w dist

# The main job on a built-in default: timm's released convmixer_768_32 from the Hugging Face
# Hub (or its cache) converted, proven against timm's model, exported, and the photo in
# docs/photos classified; offline, a seeded random checkpoint in the paper's nn.Sequential
# layout instead, and the demo says its answers mean nothing.
demo: install
	$(PY) -m weights_converter.demo --output demo

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

# The fast suite on two worker processes (pytest-xdist): most of its time is spent in
# single-threaded work (imports, tracing, conversions) that two cores halve. Both sets
# end with their ten slowest tests: where the time goes.
test: install lint
	$(PY) -m pytest -m "not slow" -n 2 --durations=10

test-slow: install
	$(PY) -m pytest -m slow --durations=10

test-all: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) demo .pytest_cache node_modules build dist
