#!/usr/bin/env bash
# Create (or reuse) ./.venv and install ldm_compat with its test extras.
# torch is pinned to 2.13.0 first so pip takes the local CPU wheel instead of downloading a CUDA build;
# the package itself only asks for torch>=2.4, which 2.13.0 satisfies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip 2>/dev/null || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[test]"
