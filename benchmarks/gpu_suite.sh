#!/usr/bin/env bash
# Issue 17's GPU measurements in one run (< 8 min on one H100/H200): benchmarks/results/<date>-<gpu>.json and a
# table in benchmarks/RESULTS.md. Arguments go to benchmarks/gpu_suite.py (e.g. --budget-s 400, --sections unet,ema).
#
#   PYTHON   the interpreter with a CUDA torch (default: python3)
#   WHEELS   a folder of wheels to install first into /tmp/gpu_suite_site (default: .whl, if it exists): the
#            packages the machine lacks, e.g. diffusers and omegaconf on this project's device image
#   OUT      if set (the device tool's output folder), the JSON and RESULTS.md are copied there
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_suite_site \
        "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/gpu_suite_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TQDM_DISABLE=1
"$PY" -c 'import torch, diffusers, omegaconf; assert torch.cuda.is_available(), "no CUDA device"' || {
    echo "gpu_suite.sh: needs a CUDA torch with diffusers and omegaconf importable (see benchmarks/README.md)" >&2
    exit 2
}
marker=$(mktemp)
status=0
"$PY" benchmarks/gpu_suite.py "$@" || status=$?
if [ -n "${OUT:-}" ]; then
    find benchmarks/results -name '*.json' -newer "$marker" -exec cp {} "$OUT/" \;
    cp benchmarks/RESULTS.md "$OUT/"
fi
rm -f "$marker"
exit $status
