#!/usr/bin/env bash
# One GPU call: batch-1 decode through the engine (latency.py, ctx 1024) with a jax.profiler trace
# of the decode steps, under each XLA command-buffer setting in FLAGSETS. JSON + log into $OUT.
#   OUT=/tmp/out bash bench/run_gpu_latency_flags.sh
#   FLAGSETS="default skiptemp" CONTEXTS=128,1024,2048 REPEATS=2 OUT=... bash bench/run_gpu_latency_flags.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
OUT=${OUT:?set OUT}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
source bench/gpu_install.sh && gpu_install || exit 1
declare -A FLAGS=(
  [default]=""
  [cond]="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE"
  [nocmdbuf]="--xla_gpu_enable_command_buffer="
  [skiptemp]="--xla_gpu_command_buffer_update_mode=SKIP_TEMP"
)
for name in ${FLAGSETS:-default cond nocmdbuf}; do
  echo "=== $name XLA_FLAGS='${FLAGS[$name]}' $(date -u +%T)"
  XLA_FLAGS="${FLAGS[$name]}" timeout -k 10 ${LAT_S:-120} $PY bench/latency.py \
    --model bench/configs/llama3.1-8b --load-format dummy --contexts ${CONTEXTS:-1024} \
    --decode-tokens 32 --repeats ${REPEATS:-1} --trace-dir /tmp/trace_$name --out "$OUT/latency_$name.json" \
    > "$OUT/latency_$name.log" 2>&1
  echo "=== $name rc=$?"; grep -E "^ +[0-9]+ +[0-9.]+ +|gaps/step|families|^-- " "$OUT/latency_$name.log" | head -12
done
