#!/usr/bin/env bash
# End-to-end benchmarks on one GPU: latency + offline throughput (xlaserve, Llama-3.1-8B shape,
# bf16, dummy weights) and the HF transformers peer, in one go; JSON into $OUT; a short summary
# table last.
#
#   OUT=/tmp/out bash bench/run_e2e_gpu.sh                        # latency throughput peers
#   OUT=/tmp/out bash bench/run_e2e_gpu.sh latency                # one part (or several)
#   OUT=/tmp/out bash bench/run_e2e_gpu.sh serving                # gRPC load sweep + PNG
#   OUT=/tmp/out bash bench/run_e2e_gpu.sh summary                # only re-print the table
#
# Knobs (environment): LAT_ARGS, THR_ARGS, SERVE_ARGS, PEER_ARGS (extra flags per part),
# PEER_MODES (default "eager"; "eager static_compile" adds torch.compile, slow to compile),
# XLA_CACHE (persistent compilation cache; default build/xla_cache, git-ignored, so a warm machine
# reuses compiles across calls), PYTHON.
# Files written to $OUT (at most 7): latency.json throughput.json peers.json serving.json
# serving.png e2e.log summary.txt. A part that fails is reported and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
OUT=${OUT:-bench/results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
LOG="$OUT/e2e.log"
XLA_CACHE=${XLA_CACHE:-build/xla_cache}
# jax preallocates 75% of the GPU by default; the runner sizes the KV cache from jax's limit.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
PARTS=${*:-latency throughput peers}
MODEL=bench/configs/llama3.1-8b

pip install -q --no-deps -e . 2>&1 | tail -2

status=0
run_part() {  # name, command...
  local name=$1; shift
  echo "=== $name: $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}

{ echo "date: $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader 2>/dev/null; git rev-parse HEAD 2>/dev/null;
  $PY -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__)'; } \
  | tee -a "$LOG"

for part in $PARTS; do
  case $part in
    latency)
      # 4 compiles: T buckets 16 (decode), 128, 1024, 2048 (prefill chunks), S bucket 1.
      run_part latency $PY bench/latency.py --model $MODEL --load-format dummy \
        --contexts 128,1024,2048,4096 --decode-tokens 64 --repeats 3 \
        --compilation-cache-dir "$XLA_CACHE" --out "$OUT/latency.json" ${LAT_ARGS:-} ;;
    throughput)
      # 4 compiles: T buckets 256, 512, 1024, 2048, one S bucket of 256.
      run_part throughput $PY bench/throughput.py --model $MODEL --load-format dummy \
        --cases 128/128:1024 2048/128:256 --max-num-seqs 256 --max-num-batched-tokens 2048 \
        --compilation-cache-dir "$XLA_CACHE" --out "$OUT/throughput.json" ${THR_ARGS:-} ;;
    peers)
      run_part peers $PY bench/peers.py --config $MODEL --modes ${PEER_MODES:-eager} \
        --cases 1x128x64 1x1024x64 1x2048x16 1x4096x16 32x128x128 8x2048x128 \
        --out "$OUT/peers.json" ${PEER_ARGS:-} ;;
    serving)
      run_part serving $PY bench/serving.py --model $MODEL --load-format dummy \
        --rates 4 16 64 inf --concurrency 1 8 32 64 128 256 --num-prompts 200 \
        --compilation-cache-dir "$XLA_CACHE" --out "$OUT/serving.json" \
        --plot "$OUT/serving.png" ${SERVE_ARGS:-} ;;
    summary) ;;
    *) echo "unknown part: $part (latency throughput peers serving summary)"; status=2 ;;
  esac
done

echo "=== summary" | tee -a "$LOG"
$PY bench/e2e_summary.py "$OUT" | tee "$OUT/summary.txt"
$PY bench/e2e_summary.py "$OUT" --markdown >> "$OUT/summary.txt"
exit $status
