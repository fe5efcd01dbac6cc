#!/usr/bin/env bash
# Install (scripts/setup_env.sh) and run the offline demo end to end (`ldm-compat demo`).
# Extra arguments go to `ldm-compat demo`, e.g. ./scripts/demo.sh --output demo_output
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ldm-compat demo "$@"
