#!/usr/bin/env bash
# The main job, set-up included: the end-to-end federated demo on loopback.
#   scripts/demo.sh                      nEMO found (../shared/data/nemo, $FEDSER_NEMO): a RAVDESS-only base meets
#                                        Polish speakers' devices; 5 rounds (15 s to 1.5 minutes)
#                                        else RAVDESS: held-out actors, one round (30 s to 3 minutes)
#                                        else a synthetic tone corpus, which says so
#   scripts/demo.sh --experiments        then the short federated suite (RAVDESS; 3 to 10 more minutes on 2 cores)
#   scripts/demo.sh --no-nemo            the RAVDESS story even with nEMO there (or FEDSER_NEMO=/missing)
#   scripts/demo.sh --nemo DIR --data RAVDESS_DIR
#   scripts/demo.sh --synthetic
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m tools.demo "$@"
