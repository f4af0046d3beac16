#!/bin/bash
# stop 31's second rule: fedser-train's old defaults against log-mel + level, both corpora, seeds 0-2 (~40 s a run)
set -e
cd "$(dirname "$0")/../../../.." && . .venv/bin/activate
for seed in 0 1 2; do
  for v in default logmel-level; do
    # "default" was fedser-train's default before this stop (MFCC, no per-utterance normalisation); spelled out, as
    # the defaults are now the other variant's
    extra="--features mfcc --utterance-norm none"; [ "$v" = logmel-level ] && extra="--features logmel --utterance-norm level"
    fedser-train train --out runs/s31defaults/$v-seed$seed --corpus ravdess,nemo --seed $seed --no-progress --cache .cache/features $extra > runs/s31defaults/$v-seed$seed.log 2>&1
    echo "$v $seed done $(date -u +%T)"
  done
done
