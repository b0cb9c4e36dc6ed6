#!/usr/bin/env bash
# One GPU call: which GEMM backend/tiling serves the decode step's skinny (T=16) GEMMs best?
# Times the packed decode step (bench/decode_breakdown.py, back to back, with a kernel trace) under
# several XLA flag sets, each in its own process (flags apply at backend start), at batch 1 and 64;
# then batch-1 latency through the engine (bench/latency.py) with the fastest set.
#
#   OUT=/tmp/out bash bench/run_gpu_gemm_flags.sh          (on the GPU machine, repo root)
#   SETS="base cublas" BATCHES="1" OUT=... bash bench/run_gpu_gemm_flags.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
OUT_TOP=${OUT:?set OUT}
OUT=$OUT_TOP/gemm_flags  # tarred at the end ($OUT returns few files)
PY=${PYTHON:-python3}
source bench/gpu_install.sh && gpu_session "$OUT" gemm_flags.log && gpu_install || exit 1

declare -A FLAGS=(
  [base]=""
  [cublas]="--xla_gpu_enable_triton_gemm=false"
  [cublaslt]="--xla_gpu_enable_cublaslt=true"
  [exhaustive]="--xla_gpu_exhaustive_tiling_search=true"
)
SETS=${SETS:-base cublas cublaslt exhaustive}
BATCHES=${BATCHES:-1 64}
T0=$SECONDS
for b in $BATCHES; do
  for name in $SETS; do
    echo "=== set=$name batch=$b XLA_FLAGS='${FLAGS[$name]}' $(date -u +%T)"
    trace=()
    [ "$b" = 1 ] && trace=(--trace-dir "/tmp/tr_${name}_b$b" --trace-variant full_packed)
    XLA_FLAGS="${FLAGS[$name]}" timeout -k 5 "${SET_S:-170}" $PY bench/decode_breakdown.py \
      --batch "$b" --variants full_packed,matmuls --repeats 30 "${trace[@]}" \
      --out "$OUT/gemm_${name}_b$b.json"
    echo "=== rc=$? at $((SECONDS - T0))s"
  done
done
best=$($PY - "$OUT" $SETS <<'PY'
import json, sys, pathlib
out, sets = pathlib.Path(sys.argv[1]), sys.argv[2:]
ms = {}
for s in sets:
    f = out / f"gemm_{s}_b1.json"
    if f.exists():
        ms[s] = json.loads(f.read_text())["variants_ms"]["full_packed"]["ms_pipelined"]
print(min(ms, key=ms.get) if ms else "base", file=sys.stdout)
print("batch-1 packed step ms by flag set:", ms, file=sys.stderr)
PY
)
echo "=== best set: $best (${FLAGS[$best]}) at $((SECONDS - T0))s"
if [ $((SECONDS - T0)) -lt "${LATENCY_IF_BEFORE_S:-330}" ]; then
  XLA_FLAGS="${FLAGS[$best]}" timeout -k 5 "${LAT_S:-230}" $PY bench/latency.py \
    --model bench/configs/llama3.1-8b --load-format dummy --contexts 1024,4096,8192 \
    --decode-tokens 32 --repeats 2 --out "$OUT/latency_$best.json"
  echo "=== latency rc=$? at $((SECONDS - T0))s"
fi
tar czf "$OUT_TOP/gemm_flags.tgz" -C "$OUT_TOP" gemm_flags
