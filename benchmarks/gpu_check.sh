#!/usr/bin/env bash
# GPU run kit: CUDA tests, headline benchmark cells, model-vs-measured results file.
# Usage (repository root or anywhere): bash benchmarks/gpu_check.sh [--skip-tests] [--out FILE]
# Needs no network. On an H100/H200: under 8 minutes, writes benchmarks/results/<device>-<date>.json
# (commit it). Without a GPU: a dry run that exits 0 and says so. See benchmarks/README.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
exec "$PYTHON" -m benchmarks.gpu_check "$@"
