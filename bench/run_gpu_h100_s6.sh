#!/usr/bin/env bash
# Issue 3 on one H100 (session 6), in two calls:
#   PART=a  Nsight Compute counters of the decode kernels at B=64 ctx 1024 (ours, jax's
#           paged_attention at its defaults and at its best scan parameters), then the tuning
#           sweep of the main keys (H128 L16 G4: decode, prefill, mixed) timed on the device
#   PART=b  the sweep of the G 1 / G 8 / H 64 keys (decode, prefill, mixed) on this H100 and the
#           current kernel (they were tuned on an H200 with an older kernel version)
#   PART=a OUT=/tmp/out bash bench/run_gpu_h100_s6.sh
# Each sweep writes its table after every key (pallas_kernels/tuning_h100.json here, copied to
# $R/), so a timeout keeps the keys done.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
R=${OUT:?set OUT}/s6h100${PART:?set PART}
PY=${PYTHON:-python3}
source bench/gpu_install.sh && gpu_session "$R" session.log "part $PART" && gpu_install || exit 1
T0=$SECONDS
sweep() {  # sweep the given keys; keep the table whatever happens
  timeout -s ABRT -k 5 "$1" $PY bench/attention_sweep.py --extra --only "$2" --no-splits \
    --out "$R/attention_sweep.json"
  echo "=== sweep rc=$? at $((SECONDS - T0))s"
  cp pallas_kernels/tuning_h100.json "$R/tuning_h100.json"
}
if [ "$PART" = a ]; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  echo "ncu: ${NCU:-none}"
  M=$($PY -c "import sys; sys.path.insert(0, 'bench'); import attention_ncu as a; print(','.join(a.METRICS))")
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -s ABRT -k 5 200 "$NCU" --clock-control none \
    -k regex:attention --metrics "$M" \
    -f -o "$R/attention_ncu" $PY bench/attention_ncu.py --out "$R/attention_ncu_meta.json"
  echo "=== ncu rc=$? at $((SECONDS - T0))s"
  "$NCU" --import "$R/attention_ncu.ncu-rep" --csv --print-units base > "$R/attention_ncu.csv"
  $PY bench/attention_ncu.py --summarize "$R/attention_ncu.csv" --meta "$R/attention_ncu_meta.json" \
    --out "$R/attention_ncu.json"
  echo "=== ncu summary rc=$? at $((SECONDS - T0))s"
  sweep "${SWEEP_S:-$((560 - SECONDS + T0))}" H128_L16_G4_decode,H128_L16_G4_prefill,H128_L16_G4_mixed${MORE_KEYS:+,$MORE_KEYS}
else
  keys=""
  for k in ${KEYS:-H128_L16_G8 H128_L16_G1 H64_L16_G4}; do for c in decode prefill mixed; do
    keys="$keys${keys:+,}${k}_$c"; done; done
  sweep "${SWEEP_S:-560}" "$keys"
fi
tar czf "$OUT/s6h100$PART.tgz" -C "$OUT" "s6h100$PART"
