#!/usr/bin/env bash
# One H100 call (session 3): batch-1 latency at ctx 1024 with max_model_len 2112 and 8224 after the
# q-length class fix (T=16 buckets take the decode tiles), then the HF transformers peer with a
# static cache and torch.compile.   OUT=/tmp/out bash bench/run_gpu_h100_s3c.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
R=${OUT:?set OUT}/s3c
PY=${PYTHON:-python3}
MODEL=bench/configs/llama3.1-8b
source bench/gpu_install.sh && gpu_session "$R" && gpu_install || exit 1
T0=$SECONDS
for mml in 2112 8224; do
  timeout -k 5 "${LAT_S:-75}" $PY bench/latency.py --model $MODEL --load-format dummy \
    --contexts 1024 --decode-tokens 64 --repeats 2 --max-model-len $mml \
    --out "$R/latency_1k_mml$mml.json" | tail -4
  echo "=== latency mml=$mml rc=$? at $((SECONDS - T0))s"
done
timeout -k 5 "${PEER_S:-240}" $PY bench/peers.py --config $MODEL --modes static_compile eager \
  --cases 1x1024x64 32x128x128 --out "$R/peers_static_compile.json"
echo "=== peers rc=$? at $((SECONDS - T0))s"
tar czf "$OUT/s3c.tgz" -C "$OUT" s3c
