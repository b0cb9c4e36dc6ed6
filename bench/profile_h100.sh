#!/usr/bin/env bash
# `xlaserve profile` of an 8B-shaped Llama (bench/configs/llama3.1-8b, dummy bf16 weights) on one
# GPU: per-bucket compile time, cache hits, HLO and custom calls (Pallas kernels), XLA cost and
# memory analysis, roofline and measured step time. Two runs over one fresh compilation cache:
#   1. cold compile, datasheet peaks (the table entry of this GPU), --run, plot;
#   2. the same programs from the persistent cache, peaks measured here (--calibrate), --run.
# Writes (6 files) to $OUT (default bench/results): profile_h100{,_cached}.{json,txt} and
# profile_h100{,_calibrated}.png. Run from the repo root on the GPU machine:
#   bash bench/profile_h100.sh
# MODEL=builtin:tiny BUCKETS=16x8 OUT=/tmp/x bash bench/profile_h100.sh is a CPU dry run.
# BUCKETS="all" profiles every bucket of the engine (about a minute of compile each at 8B);
# the default is a representative subset so that both runs fit in ten minutes.
set -euo pipefail
OUT="${OUT:-bench/results}"
PY="${PYTHON:-python3}"
MODEL="${MODEL:-bench/configs/llama3.1-8b}"
BUCKETS="${BUCKETS:-16x8 64x64 256x64 512x8 2048x8}"
mkdir -p "$OUT"
"$PY" -c "import xlaserve.runtime.profile" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps --no-build-isolation -e .
CACHE="$(mktemp -d)/jax_cache"
ARGS=(--model "$MODEL" --load-format dummy --dtype bfloat16
      --max-num-batched-tokens 2048 --max-num-seqs 64 --max-model-len 4096 --page-size 16
      --compilation-cache-dir "$CACHE" --run --repeats 20)
[ "$BUCKETS" = "all" ] || ARGS+=(--buckets $BUCKETS)
"$PY" -c "import jax; print('device:', jax.devices()[0].device_kind, jax.__version__)"
PEAKS=()  # the datasheet entry for this GPU; measured instead when the table has none
"$PY" -c "import jax; from xlaserve.runtime.hardware import peaks_for_device as p; \
print('peaks:', p(jax.devices()[0]).name)" || PEAKS=(--calibrate)
"$PY" -m xlaserve profile "${ARGS[@]}" "${PEAKS[@]}" --json "$OUT/profile_h100.json" \
  --plot "$OUT/profile_h100.png" | tee "$OUT/profile_h100.txt"
"$PY" -m xlaserve profile "${ARGS[@]}" --calibrate --json "$OUT/profile_h100_cached.json" \
  --plot "$OUT/profile_h100_calibrated.png" | tee "$OUT/profile_h100_cached.txt"
