#!/usr/bin/env bash
# One GPU call: decode-step breakdown (bench/decode_breakdown.py, with the optimized HLO of the
# full step dumped) and `xlaserve profile` of the 8B shape (issue 7's H100 run).
#   OUT=/tmp/out bash bench/run_gpu_profile.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
PY=${PYTHON:-python3}
MODEL=bench/configs/llama3.1-8b
mkdir -p "$OUT"
exec > >(tee -a "$OUT/profile_session.log") 2>&1
source bench/gpu_install.sh && gpu_install || exit 1
echo "=== breakdown $(date -u +%T)"
XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_module_re=jit_full --xla_dump_hlo_as_text" \
  timeout -k 10 150 $PY bench/decode_breakdown.py --config $MODEL --out "$OUT/decode_breakdown_h100.json"
f=$(ls -S /tmp/dump/*jit_full*after_optimizations.txt 2>/dev/null | head -1)
[ -n "$f" ] && gzip -c "$f" > "$OUT/decode_step_h100.hlo.txt.gz"
echo "=== profile $(date -u +%T)"
timeout -k 10 200 $PY -m xlaserve profile --model $MODEL --load-format dummy \
  --dtype bfloat16 --max-num-batched-tokens 2048 --max-num-seqs 64 --max-model-len 4096 \
  --page-size 16 --buckets 16x8 512x8 2048x8 --run --repeats 10 \
  --json "$OUT/profile_h100.json" --plot "$OUT/profile_h100.png" | tee "$OUT/profile_h100.txt"
echo "=== done $(date -u +%T)"
