#!/usr/bin/env bash
# Data parallelism through the gRPC server (session 8), 2 x H200: bench/serving.py at data 1 and
# 2 (Llama-3.1-8B shape, bf16, dummy weights, 128/128, closed-loop concurrency 64 and 256, 512
# requests per level); the server is `serving.py serve` (the engine of bench/e2e_common.py).
#   OUT=/tmp/out bash bench/run_gpu_serve_dp.sh
set -uo pipefail
cd "$(dirname "$0")/.."
# grpc_health / grpc_reflection are not installed on the GPU machine: carried in .pydeps/.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD/.pydeps${PYTHONPATH:+:$PYTHONPATH}
R=${OUT:?set OUT}/serve_dp
PY=${PYTHON:-python3}
source bench/gpu_install.sh && gpu_session "$R" session.log "serving at data 1 and 2" \
  && gpu_install || exit 1
T0=$SECONDS
for dp in 1 2; do
  timeout -s ABRT -k 5 "${SERVE_S:-230}" $PY bench/serving.py --data-parallel-size $dp --rates \
    --concurrency ${LEVELS:-64 256} --num-prompts 512 --compilation-cache-dir /tmp/xc \
    --out "$R/serving_dp$dp.json" --plot "$R/serving_dp$dp.png" > "$R/serving_dp$dp.log" 2>&1
  echo "=== serving dp$dp rc=$? at $((SECONDS - T0))s"; grep "concurrency\|serving " "$R/serving_dp$dp.log" | tail -4
done
tar czf "$OUT/serve_dp.tgz" -C "$OUT" serve_dp
