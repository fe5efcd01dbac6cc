#!/usr/bin/env bash
# Install (scripts/setup_env.sh) and run the whole test suite offline on the CPU, plus ruff.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k scheduler
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ruff check .
# pytest exits 5 when it collects no test; with `set -e` that fails the script, as it should.
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" "$@"
