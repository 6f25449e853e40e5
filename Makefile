# Two commands do all the set-up on a fresh machine:
#   make demo   # venv + install + convert a built-in checkpoint, proving parity and exporting
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

# The main job on a built-in default: a convmixer_768_32 checkpoint in the paper's
# nn.Sequential layout (random weights, random BatchNorm statistics) is written, then
# converted, proven against timm's model, and exported.
demo: install
	$(PY) -m weights_converter.demo demo/convmixer_768_32.pth
	$(PY) -m weights_converter --torch-ckpt demo/convmixer_768_32.pth --export all --calibration-count 8 --force
	@echo "Try it (docs/try-it.md): classify images with any file written, or open the phone's file in a browser:"
	@echo "  $(PY) -m convmixer_tf.predict --model demo/convmixer_768_32_keras/model_int8.onnx IMAGES..."
	@echo "  $(PY) -m convmixer_tf.web --model demo/convmixer_768_32_keras/model_int8.tflite"

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
