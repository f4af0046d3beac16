#!/usr/bin/env bash
# The test suite, set-up included. Default: fast tests (well under 15 minutes on 2 cores).
#   scripts/test.sh            fast suite
#   scripts/test.sh --slow     the slow tests only (full training runs)
#   scripts/test.sh -k wire    any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
if [ "${1:-}" = "--slow" ]; then
  shift
  exec .venv/bin/python -m pytest -m slow "$@"
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
