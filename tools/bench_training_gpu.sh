#!/usr/bin/env bash
# The GPU half of tools/bench_training.py, as run on a lent GPU machine with no TensorFlow and no corpus:
#   ./tools/bench_training_gpu.sh PACK OUT
# PACK: `python -m tools.bench_training pack --task A --recipe A0 --out PACK` made on a host with the corpora.
# Needs python3 with JAX (CUDA) and Keras 3 importable. Writes into OUT: bench.jsonl (one line per run), log.txt
# and the recipe run's trained.npz, trained.json, report.json (export it on a host with TensorFlow:
# `fedser-train export --trained DIR`).
set -uo pipefail
PACK=$1 OUT=$2
mkdir -p "$OUT" /tmp/bench
export PYTHONUNBUFFERED=1 KERAS_BACKEND=${KERAS_BACKEND:-jax}
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import keras, jax; print('keras', keras.__version__, 'jax', jax.__version__, jax.devices())" \
  || { echo "Keras on JAX is unusable here: trying KERAS_BACKEND=torch (untested)"; export KERAS_BACKEND=torch; }
run() {  # name, then arguments
  local name=$1; shift
  rm -rf "/tmp/bench/$name"
  python3 -m tools.bench_training train --pack "$PACK" --recipe A0 "$@" --out "/tmp/bench/$name" 2>&1 | grep -v " INFO models: epoch " | tail -3
  [ -f "/tmp/bench/$name/bench.json" ] && python3 -c "import json,sys; print(json.dumps({'run': sys.argv[2], \
**json.load(open(sys.argv[1]))}))" "/tmp/bench/$name/bench.json" "$name" >> "$OUT/bench.jsonl"
}
# the recipe as shipped (deep head, seed 0, early stopping), mixed precision (auto: on a GPU) and float32
run a0-gpu --trainable-embedding
run a0-gpu-f32 --trainable-embedding --mixed-precision off
# equal work for the timing: the training examples 13 times (6,552 per epoch, about B-speed's 6,423), 5 epochs
run tile13-gpu --tile 13 --epochs 5
run tile13-gpu-f32 --tile 13 --epochs 5 --mixed-precision off
# the same on that machine's CPU cores
JAX_PLATFORMS=cpu run tile13-cpu --tile 13 --epochs 3
for f in trained.npz trained.json report.json; do cp "/tmp/bench/a0-gpu/$f" "$OUT/a0-gpu-$f" 2>/dev/null; done
ls -la "$OUT"
