#!/usr/bin/env bash
# What session 7 wrote but could not run (no device time left), for one GPU call:
#   1. the compiled tests of the tuning table's tiles: page sizes 8/32/64/128 (8 and 128 have no
#      entries: the default scaled to its keys per block), G 8/16, float32 and bf16
#   2. SWEEP=1: the tuning sweep of the keys that have no entry yet (H128 L16 G16: one-KV-head
#      models; H64 L16 G8: Qwen2.5-0.5B), ~45 s a key; writes pallas_kernels/tuning_h100.json
#   OUT=/tmp/out bash bench/run_gpu_next.sh     (any one GPU; then the tp run below on 4 GPUs)
#   OUT=/tmp/out BENCH_S=480 bash bench/run_gpu_tp_kv.sh   (4 x H200: tp 4 timing, Qwen2.5-3B)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
R=${OUT:?set OUT}/next
PY=${PYTHON:-python3}
source bench/gpu_install.sh && gpu_session "$R" session.log "tiles not yet compiled" && gpu_install || exit 1
JAX_PLATFORMS=cuda timeout -k 5 "${TEST_S:-400}" $PY -m pytest -q -p no:cacheprovider \
  tests/kernels/test_ragged_paged_attention.py -k "not Interpret and (table_tiles or page_sizes)" \
  > "$R/pytest_tiles_compiled.txt" 2>&1
echo "=== pytest rc=$?"; tail -3 "$R/pytest_tiles_compiled.txt"
if [ "${SWEEP:-0}" = 1 ]; then
  keys=""
  for k in H128_L16_G16 H64_L16_G8; do for c in decode prefill mixed; do
    keys="$keys${keys:+,}${k}_$c"; done; done
  timeout -s ABRT -k 5 "${SWEEP_S:-360}" $PY bench/attention_sweep.py --extra --only "$keys" \
    --no-splits --out "$R/attention_sweep.json"
  echo "=== sweep rc=$?"; cp pallas_kernels/tuning_h100.json "$R/tuning_h100.json"
fi
tar czf "$OUT/next.tgz" -C "$OUT" next
