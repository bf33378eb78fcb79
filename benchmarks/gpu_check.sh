#!/usr/bin/env bash
# GPU run kit: CUDA tests, headline benchmark cells, model-vs-measured results file.
# Usage (repository root or anywhere): bash benchmarks/gpu_check.sh [--skip-tests] [--out FILE]
# Needs no network. On an H100/H200: under 8 minutes, writes benchmarks/results/<device>-<date>.json
# (commit it). Without a GPU: a dry run that exits 0 and says so. See benchmarks/README.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The interpreter: $PYTHON if set, else the active virtual environment's, else ./.venv's, else python.
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python
  if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
fi
exec "$PYTHON" -m benchmarks.gpu_check "$@"
