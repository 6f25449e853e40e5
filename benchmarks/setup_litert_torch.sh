#!/usr/bin/env bash
# A separate virtual environment for the litert-torch peer of bench_export.py
# (litert-torch brings its own torch/jax/transformers stack; kept apart from ours).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-litert-torch}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q litert-torch==0.10.0 timm==1.0.31 torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -c "import litert_torch, timm; print('litert-torch ready in $VENV')"
