#!/usr/bin/env bash
# Session 14.
#   PART=attn (one GPU): batch-1 decode attention as the runner calls it, per-device heads of
#           tp=2 (16 q / 4 KV) and tp=1 (32 / 8) at context 1024 (and 4096 for tp=2): the
#           table's tiles against KV splits 1-32 x pages per block 2/4/8 x stages 2/3
#           (bench/attention_decode_small.py: kernel + split-combine device time per call).
#           COLD=N: the timed calls rotate over N K/V copies, so each reads K/V from HBM as
#           in the model (without it, 20 calls on 2 MB of K/V hit in L2: 5.9 us against the
#           model's 9.0 us per layer at tp=2, call 1).
#   OUT=/tmp/out PART=attn [COLD=48] bash bench/run_gpu_s14.sh
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
  COLD=${COLD:-0}
  SW=(--ppb 2 4 8 --splits 1 2 4 8 16 32 --stages 2 3 --table-width 2064
      --calls $((COLD > 20 ? COLD : 20)) --cold $COLD)
  for hk in "16 4 1024 4096" "32 8 1024"; do
    set -- $hk
    h=$1 k=$2; shift 2
    timeout -k 5 240 $PY bench/attention_decode_small.py --heads $h --kv-heads $k \
      --contexts "$@" "${SW[@]}" --out "$R/attn_h${h}_k${k}_c$COLD.json" \
      > "$R/attn_h${h}_k${k}_c$COLD.log" 2>&1
    echo "=== attn $h/$k cold $COLD rc=$? at $((SECONDS - T0))s"
    grep "^==" "$R/attn_h${h}_k${k}_c$COLD.log"
  done
fi
