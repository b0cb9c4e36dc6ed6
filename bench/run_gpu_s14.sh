#!/usr/bin/env bash
# Session 14.
#   PART=attn (one GPU): batch-1 decode attention as the runner calls it, per-device heads of
#           tp=2 (16 q / 4 KV) and tp=1 (32 / 8) at context 1024 (and 4096 for tp=2): the
#           table's tiles against KV splits 1-32 x pages per block 2/4/8 x stages 2/3
#           (bench/attention_decode_small.py: kernel + split-combine device time per call).
#   OUT=/tmp/out PART=attn bash bench/run_gpu_s14.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NCCL_NVLS_ENABLE=0
PART=${PART:-attn}
R=${OUT:?set OUT}/s14_$PART
PY=${PYTHON:-python3}
source bench/gpu_install.sh && gpu_session "$R" session.log "session 14 part $PART" \
  && gpu_install || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T0=$SECONDS
if [ "$PART" = attn ]; then
  SW=(--ppb 2 4 8 --splits 1 2 4 8 16 32 --stages 2 3 --table-width 2064 --calls 20)
  for hk in "16 4 1024 4096" "32 8 1024"; do
    set -- $hk
    h=$1 k=$2; shift 2
    timeout -k 5 240 $PY bench/attention_decode_small.py --heads $h --kv-heads $k \
      --contexts "$@" "${SW[@]}" --out "$R/attn_h${h}_k${k}.json" > "$R/attn_h${h}_k${k}.log" 2>&1
    echo "=== attn $h/$k rc=$? at $((SECONDS - T0))s"; grep "^==" "$R/attn_h${h}_k${k}.log"
  done
fi
