#!/usr/bin/env bash
# Every GPU figure of issue 20 in one command, one table (see benchmarks/gpu_suite.py); --dry-run: on CPU, tiny.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 RAY_USAGE_STATS_ENABLED=0
PYTHON="${CURATE_PYTHON:-.venv/bin/python}"
exec "$PYTHON" benchmarks/gpu_suite.py "$@"
