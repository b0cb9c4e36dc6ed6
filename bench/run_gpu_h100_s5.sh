#!/usr/bin/env bash
# Issue 3 on one H100 (session 5): the read-only bandwidth ceiling beside the copy ceiling, then
# our kernel and jax's paged_attention at decode B=64, ctx 1024 over their parameters (each
# candidate checked against the reference; best against best), and the quick decode points.
#   OUT=/tmp/out bash bench/run_gpu_h100_s5.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
R=${OUT:?set OUT}/s5h100
PY=${PYTHON:-python3}
source bench/gpu_install.sh && gpu_session "$R" session.log && gpu_install || exit 1
timeout -s ABRT -k 5 "${SCAN_S:-480}" $PY bench/attention.py --out "$R" \
  --name attention_decode_scan.json --sections roof,decode,scan --quick
echo "=== attention rc=$?"
tar czf "$OUT/s5h100.tgz" -C "$OUT" s5h100
