#!/usr/bin/env bash
# One GPU call for the end-to-end numbers of issues 7 and 8 (Llama-3.1-8B shape, bf16, dummy
# weights): install check, latency, offline throughput, HF transformers peer, xlaserve profile.
# Each part runs under its own time limit so one slow part cannot take the others down; every
# part writes its JSON into $OUT as it finishes.
#
#   OUT=/tmp/out bash bench/run_gpu_session.sh        (on the GPU machine, repo root)
#   PARTS="latency throughput" OUT=/tmp/out bash bench/run_gpu_session.sh   (some parts only)
#
# Carry .whl/ (setuptools wheel) when the machine's setuptools is too old for editable installs
# with package-dir mappings.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
OUT=${OUT:?set OUT}
PY=${PYTHON:-python3}
MODEL=bench/configs/llama3.1-8b
CACHE=${XLA_CACHE:-/tmp/xla_cache}
LOG=$OUT/session.log
mkdir -p "$OUT"
exec > >(tee -a "$LOG") 2>&1

echo "date $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c 'import setuptools, jax; print("setuptools", setuptools.__version__, "jax", jax.__version__)'
source bench/gpu_install.sh && gpu_install || exit 1
$PY -c 'import xlaserve.runtime.engine, xlaserve.pallas_kernels.ops as o; print("impls", o.available_implementations("gpu"))' || exit 1

PARTS=${PARTS:-latency throughput peers profile}
part() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  case " $PARTS " in *" $name "*) ;; *) echo "=== $name skipped (PARTS=$PARTS)"; return ;; esac
  echo "=== $name (limit ${secs}s) $(date -u +%T)"
  local t0=$SECONDS
  timeout -k 10 "$secs" "$@"
  echo "=== $name rc=$? in $((SECONDS - t0))s"
}

part latency "${LAT_S:-200}" $PY bench/latency.py --model $MODEL --load-format dummy \
  --contexts 128,1024,2048 --decode-tokens 64 --repeats 2 --compilation-cache-dir "$CACHE" \
  --out "$OUT/latency.json"
part throughput "${THR_S:-170}" $PY bench/throughput.py --model $MODEL --load-format dummy \
  --cases 128/128:1024 2048/128:256 --max-num-seqs 256 --max-num-batched-tokens 2048 \
  --compilation-cache-dir "$CACHE" --out "$OUT/throughput.json"
part peers "${PEER_S:-90}" $PY bench/peers.py --config $MODEL --modes eager \
  --cases 1x1024x32 32x128x128 8x2048x128 --out "$OUT/peers.json"
part profile "${PROF_S:-110}" $PY -m xlaserve profile --model $MODEL --load-format dummy \
  --dtype bfloat16 --max-num-batched-tokens 2048 --max-num-seqs 64 --max-model-len 4096 \
  --page-size 16 --compilation-cache-dir "$CACHE" --buckets 16x8 512x8 2048x8 --run \
  --repeats 10 --json "$OUT/profile_h100.json" --plot "$OUT/profile_h100.png"
$PY bench/e2e_summary.py "$OUT" | tee "$OUT/summary.txt"
