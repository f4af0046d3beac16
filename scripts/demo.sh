#!/usr/bin/env bash
# The main job, set-up included: the end-to-end federated demo on loopback (about 3 minutes with the short federated suite).
#   scripts/demo.sh                      RAVDESS from ../shared/data/ravdess, else synthetic
#   scripts/demo.sh --data /path/to/RAVDESS
#   scripts/demo.sh --synthetic
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m tools.demo "$@"
