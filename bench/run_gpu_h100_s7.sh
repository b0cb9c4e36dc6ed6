#!/usr/bin/env bash
# Issue 3 on one H100 (session 7), one call: the tuning sweep of the page-size 32 and 64 keys
# (decode, prefill, mixed; they were last tuned on an H200 with an older kernel, and had no mixed
# entry), then the compiled kernel tests with the new table.
#   OUT=/tmp/out bash bench/run_gpu_h100_s7.sh
# The sweep writes its table after every key (pallas_kernels/tuning_h100.json, copied to $R/), so
# a timeout keeps the keys done.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
R=${OUT:?set OUT}/s7h100
PY=${PYTHON:-python3}
source bench/gpu_install.sh && gpu_session "$R" session.log "L32/L64 sweep" && gpu_install || exit 1
T0=$SECONDS
keys=""
for k in ${KEYS:-H128_L32_G4 H128_L64_G4}; do for c in decode prefill mixed; do
  keys="$keys${keys:+,}${k}_$c"; done; done
timeout -s ABRT -k 5 "${SWEEP_S:-420}" $PY bench/attention_sweep.py --extra --only "$keys" \
  --no-splits --out "$R/attention_sweep.json"
echo "=== sweep rc=$? at $((SECONDS - T0))s"
cp pallas_kernels/tuning_h100.json "$R/tuning_h100.json"
JAX_PLATFORMS=cuda timeout -k 5 "${TEST_S:-150}" $PY -m pytest -q -p no:cacheprovider \
  tests/kernels/test_ragged_paged_attention.py tests/kernels/test_tuning_rules.py -k "not Interpret" \
  > "$R/pytest_kernels_compiled.txt" 2>&1
echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -2 "$R/pytest_kernels_compiled.txt"
tar czf "$OUT/s7h100.tgz" -C "$OUT" s7h100
