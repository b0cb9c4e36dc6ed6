#!/usr/bin/env bash
# What session 7 wrote but could not run (no device time left), for one GPU call:
#   1. the compiled tests of the tuning table's tiles: page sizes 8/32/64/128 (8 and 128 have no
#      entries: the default scaled to its keys per block), G 8/16, float32 and bf16
# Not scripted: timing the bf16 G 16 tiles the new fallback picks (a G 16 sweep key would
# give them a measured entry).
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
tar czf "$OUT/next.tgz" -C "$OUT" next
