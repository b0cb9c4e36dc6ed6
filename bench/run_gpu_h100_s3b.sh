#!/usr/bin/env bash
# One H100 call (session 3): does the host dispatch of a decode step grow with max_model_len
# (latency.py at ctx 1024 with the page table 2112 vs 8224 keys wide, same process setup), then
# offline throughput for every case of issue 8.   OUT=/tmp/out bash bench/run_gpu_h100_s3b.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
R=${OUT:?set OUT}/s3b
PY=${PYTHON:-python3}
MODEL=bench/configs/llama3.1-8b
CACHE=/tmp/xla_cache
source bench/gpu_install.sh && gpu_session "$R" && gpu_install || exit 1
T0=$SECONDS
for mml in 2112 8224; do
  timeout -k 5 "${LAT_S:-70}" $PY bench/latency.py --model $MODEL --load-format dummy \
    --contexts 1024 --decode-tokens 32 --repeats 1 --max-model-len $mml \
    --compilation-cache-dir $CACHE --out "$R/latency_1k_mml$mml.json" | tail -4
  echo "=== latency mml=$mml rc=$? at $((SECONDS - T0))s"
done
timeout -k 5 "${THR_S:-420}" $PY bench/throughput.py --model $MODEL --load-format dummy \
  --cases 128/128:1024 128/2048:256 1000/1000:256 2048/128:256 2048/2048:128 sharegpt:512 \
  --max-num-seqs 256 --max-num-batched-tokens 2048 --compilation-cache-dir $CACHE \
  --out "$R/throughput_all.json"
echo "=== throughput rc=$? at $((SECONDS - T0))s"
tar czf "$OUT/s3b.tgz" -C "$OUT" s3b
