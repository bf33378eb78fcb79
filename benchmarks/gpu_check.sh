#!/usr/bin/env bash
# GPU run kit: CUDA tests, headline benchmark cells, model-vs-measured results file.
# Usage (from anywhere): bash benchmarks/gpu_check.sh [--skip-tests] [--out FILE]
# Needs no network: torch, triton and pytest installed. On an H100/H200: under 8 minutes, writes
# benchmarks/results/<device>-<date>.json (commit it). Without a GPU: a dry run that exits 0 and says
# so. See benchmarks/README.md and docs/performance.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The interpreter: $PYTHON if set, else the active virtual environment's, else ./.venv's, else python3.
if [ -z "${PYTHON:-}" ]; then
  if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
  elif command -v python3 >/dev/null; then PYTHON=python3
  else PYTHON=python; fi
fi
# entropy_ops.kernels maps to kernels/ through setup.py's package_dir, so a checkout must be installed
# once; offline (no index, no build isolation: the environment's setuptools builds it).
if ! "$PYTHON" -c "import entropy_ops.kernels" 2>/dev/null; then
  echo "gpu_check: installing this checkout (pip install -e . --no-deps --no-index --no-build-isolation)"
  "$PYTHON" -m pip install -q -e . --no-deps --no-index --no-build-isolation
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m benchmarks.gpu_check "$@"
