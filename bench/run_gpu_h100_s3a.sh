#!/usr/bin/env bash
# One H100 call (session 3): batch-1 decode attention tiles as the runner calls the kernel, then
# batch-1 latency at 1k/4k/8k context through the engine.   OUT=/tmp/out bash bench/run_gpu_h100_s3a.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
R=${OUT:?set OUT}/s3a
PY=${PYTHON:-python3}
source bench/gpu_install.sh && gpu_session "$R" && gpu_install || exit 1
T0=$SECONDS
(cd bench && timeout -k 5 "${ATT_S:-200}" $PY attention_decode_small.py --contexts 1024 2048 8192 \
  --table-width 8256 --stages 3 --out "$R/attn_decode_small.json")
echo "=== attention rc=$? at $((SECONDS - T0))s"
timeout -k 5 "${LAT_S:-300}" $PY bench/latency.py --model bench/configs/llama3.1-8b \
  --load-format dummy --contexts 1024,4096,8192 --decode-tokens 32 --repeats 2 \
  --out "$R/latency_ctx1k_4k_8k.json"
echo "=== latency rc=$? at $((SECONDS - T0))s"
tar czf "$OUT/s3a.tgz" -C "$OUT" s3a
