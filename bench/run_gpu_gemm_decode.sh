#!/usr/bin/env bash
# One GPU call: the decode step's skinny GEMMs with cold weights (bench/gemm_decode.py): XLA's
# autotuned tile (cold and hot L2), forced tiles, and a Pallas prototype; one process per shape
# group (a tile that crashes XLA loses only its group).
#   OUT=/tmp/out bash bench/run_gpu_gemm_decode.sh      (QUICK=0 for the full grids)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
R=${OUT:?set OUT}/gemm_decode
PY=${PYTHON:-python3}
source bench/gpu_install.sh && gpu_session "$R" session.log "decode GEMMs, cold weights" \
  && gpu_install || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T0=$SECONDS
GROUPS_=${GROUPS_:-"qkv_tp2,o_tp2 gate_up_tp2,down_tp2,lm_head_tp2 qkv_tp1,o_tp1,gate_up_tp1,down_tp1"}
i=0
for g in $GROUPS_; do
  i=$((i + 1))
  (cd bench && timeout -s ABRT -k 5 "${GROUP_S:-200}" $PY gemm_decode.py --tp 2 1 --only "$g" \
    ${QUICK:+--quick} --out "$R/gemm_$i.json") > "$R/gemm_$i.log" 2>&1
  echo "=== group $g rc=$? at $((SECONDS - T0))s"; grep -v "^WARNING\|^I0000\|^W0000" "$R/gemm_$i.log" | tail -6
done
