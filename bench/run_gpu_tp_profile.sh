#!/usr/bin/env bash
# Where the tp=1 and tp=2 batch-1 decode steps spend device time, kernel by kernel (8B shape):
#   bench/tp_scaling.py --trace-dir at tp 1 and tp 2 (each in its own run, xlaserve's all-reduce),
#   with XLA's optimized HLO dumped, so each trace kernel can be matched to its fusion.
#   OUT=/tmp/out bash bench/run_gpu_tp_profile.sh
#   -> $OUT/tp_profile/{session.log, tp1.json, tp2.json, *.log, traces_hlo.tar.gz}
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NCCL_NVLS_ENABLE=0
R=${OUT:?set OUT}/tp_profile
PY=${PYTHON:-python3}
source bench/gpu_install.sh && gpu_session "$R" session.log "tp1/tp2 decode traces + HLO" \
  && gpu_install || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T0=$SECONDS
for tp in ${TP:-1 2}; do
  XLA_FLAGS="--xla_dump_to=/tmp/hlo_tp$tp --xla_dump_hlo_as_text" \
  timeout -s ABRT -k 5 "${BENCH_S:-240}" $PY bench/tp_scaling.py --tp $tp --decode-batches 1 \
    --all-reduce ${ALL_REDUCE:-auto} --no-prefill --greedy-steps 2 --trace-dir /tmp/tp_trace \
    --trace-steps 5 --out "$R/tp$tp.json" > "$R/tp$tp.log" 2>&1
  echo "=== tp$tp rc=$? at $((SECONDS - T0))s"; grep -E "decode B=1|busy" "$R/tp$tp.log" | head -6
done
mkdir -p /tmp/pack
for tp in ${TP:-1 2}; do
  mkdir -p /tmp/pack/hlo_tp$tp
  # the optimized HLO of the few largest modules (the step programs)
  ls -S /tmp/hlo_tp$tp/*after_optimizations.txt 2>/dev/null | head -3 | xargs -r cp -t /tmp/pack/hlo_tp$tp
done
cp -r /tmp/tp_trace /tmp/pack/ 2>/dev/null
tar -czf "$R/traces_hlo.tar.gz" -C /tmp/pack . && ls -la "$R"
