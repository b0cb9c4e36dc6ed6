#!/usr/bin/env bash
# One call on 2 (or 4) GPUs: tp scaling of the 8B shape, and greedy output of tp=2 vs tp=1
# through the real CLI on the builtin model.   OUT=/tmp/out bash bench/run_gpu_tp.sh [TP...]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:?set OUT}
PY=${PYTHON:-python3}
TPS=${*:-1 2}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/tp_session.log") 2>&1
source bench/gpu_install.sh && gpu_install || exit 1
nvidia-smi --query-gpu=name --format=csv,noheader
for tp in $TPS; do
  $PY -m xlaserve generate --model builtin:tiny --dtype float32 --tensor-parallel-size "$tp" \
    --prompt "The quick brown fox" --max-tokens 32 --temperature 0 --json \
    > "$OUT/greedy_tp$tp.json" || echo "greedy tp=$tp failed"
done
$PY - "$OUT" $TPS <<'PY'
import json, sys
out, tps = sys.argv[1], sys.argv[2:]
toks = {tp: json.load(open(f"{out}/greedy_tp{tp}.json"))["token_ids"] for tp in tps}
print("greedy token ids equal across tp:", all(t == toks[tps[0]] for t in toks.values()), toks)
PY
timeout -k 10 ${TP_S:-300} $PY bench/tp_scaling.py --tp $TPS --decode-batches 1 \
  --out "$OUT/tp_scaling.json"
