#!/usr/bin/env bash
# Session 20 (issue 6): the decode skinny GEMM's weight layout.
#   OUT=/tmp/out COMMIT=<hash> PART=layout bash bench/run_gpu_s20.sh   (one H200; carry .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 20 layout || exit 1
if [ "$PART" = layout ]; then  # kn / nk / tiled weights, tp=2 shapes then tp=1's q/k/v
  cd bench
  timeout -s ABRT -k 5 ${LIMIT:-540} $PY gemm_layout.py --quick --out "$R/layout.json" \
    --variants ${VARIANTS:-kn,nk,tiled} \
    --only ${ONLY:-qkv_tp2,o_tp2,down_tp2,gate_up_tp2,qkv_tp1} 2>&1 | grep -v Warning
  echo "=== layout rc=$? at $((SECONDS - T0))s"
fi
