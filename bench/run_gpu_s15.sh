#!/usr/bin/env bash
# Session 15: L2 prefetch of decode GEMM weights during latency-bound kernels.
#   PART=l2 (one GPU): bench/l2_prefetch.py (spin kernel +- prefetch, then the GEMM, per layer
#           of a 12-layer chain with distinct weights; the 8B shape's decode GEMMs).
#   OUT=/tmp/out PART=l2 bash bench/run_gpu_s15.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NCCL_NVLS_ENABLE=0
PART=${PART:-l2}
R=${OUT:?set OUT}/s15_$PART
PY=${PYTHON:-python3}
source bench/gpu_install.sh && gpu_session "$R" session.log "session 15 part $PART" \
  && gpu_install || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T0=$SECONDS
if [ "$PART" = l2 ]; then
  timeout -s ABRT -k 5 400 $PY bench/l2_prefetch.py ${SHAPES:+--shapes $SHAPES} \
    --out "$R/l2_prefetch.json" > "$R/l2_prefetch.log" 2>&1
  echo "=== l2_prefetch rc=$? at $((SECONDS - T0))s"
  tail -5 "$R/l2_prefetch.log"
fi
