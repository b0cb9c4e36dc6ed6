#!/usr/bin/env bash
# One GPU call: where the decode step's time goes (issue 8), under several XLA settings.
# bench/decode_breakdown.py per case (8B shape, dummy weights), with a jax.profiler trace of the
# full step summarised per kernel (bench/trace_summary.py). Every case writes its JSON to $OUT.
#   OUT=/tmp/out bash bench/run_gpu_diag.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
OUT=${OUT:?set OUT}
PY=${PYTHON:-python3}
MODEL=bench/configs/llama3.1-8b
source bench/gpu_install.sh && gpu_session "$OUT" diag.log && gpu_install || exit 1

case_() {  # name, seconds, xla flags, args...
  local name=$1 secs=$2 flags=$3; shift 3
  echo "=== $name (XLA_FLAGS='$flags') $(date -u +%T)"
  XLA_FLAGS="$flags" timeout -k 10 "$secs" $PY bench/decode_breakdown.py --config $MODEL \
    --out "$OUT/bd_$name.json" "$@"
  echo "=== $name rc=$?"
}
CASES=${CASES:-b1 b1_no_cmdbuf b64 b64_no_cmdbuf b256 b256_no_cmdbuf}
for c in $CASES; do
  case $c in
    b1) case_ b1 120 "" --variants full,full_packed,forward,no_attn,matmuls --trace-dir /tmp/tr_b1 --trace-variant full_packed ;;
    b1_small_pool) case_ b1_small_pool 80 "" --num-pages 160 --variants full,forward ;;
    b1_no_cmdbuf) case_ b1_no_cmdbuf 80 "--xla_gpu_enable_command_buffer=" \
      --variants full,full_packed,forward --trace-dir /tmp/tr_nocb --trace-variant full_packed ;;
    b1_cmdbuf_cond) case_ b1_cmdbuf_cond 80 \
      "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE" \
      --variants full,forward ;;
    b1_no_triton_gemm) case_ b1_no_triton_gemm 80 "--xla_gpu_enable_triton_gemm=false" \
      --variants full,matmuls --trace-dir /tmp/tr_notg --trace-steps 3 ;;
    b64) case_ b64 90 "" --batch 64 --num-pages 4400 --variants full,full_packed \
      --trace-dir /tmp/tr_b64 --trace-variant full_packed ;;
    b256) case_ b256 90 "" --batch 256 --context 256 --num-pages 4700 --variants full,full_packed \
      --trace-dir /tmp/tr_b256 --trace-variant full_packed ;;
    b64_no_cmdbuf) case_ b64_no_cmdbuf 90 "--xla_gpu_enable_command_buffer=" --batch 64 \
      --num-pages 4400 --variants full,full_packed ;;
    b256_no_cmdbuf) case_ b256_no_cmdbuf 90 "--xla_gpu_enable_command_buffer=" --batch 256 \
      --context 256 --num-pages 4700 --variants full,full_packed ;;
  esac
done
echo "=== done $(date -u +%T)"
