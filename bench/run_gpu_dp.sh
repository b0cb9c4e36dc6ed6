#!/usr/bin/env bash
# Data parallelism (session 8) on 2 x H200, one call:
#   1. the builtin model through the CLI at --data-parallel-size 1 and 2 (float32): a batch job of
#      8 prompts; same greedy tokens?
#   2. bench/throughput.py on the Llama-3.1-8B shape (bf16, dummy weights) at data 1 then 2, each
#      its own process, same compile cache: output tokens/s of CASES (default 128/128:1024 and
#      2048/128:256) and the ratio
#   PART=a: 0. the compiled kernel tests of the float32 table tiles (and L 8/128), with
#              tracebacks (session 8's H100 run lost them to a timeout), then 1.
#   PART=b: 2.
#   OUT=/tmp/out PART=a bash bench/run_gpu_dp.sh; OUT=/tmp/out PART=b bash bench/run_gpu_dp.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NCCL_NVLS_ENABLE=0
R=${OUT:?set OUT}/dp${PART:?set PART}
PY=${PYTHON:-python3}
CASES=${CASES:-128/128:1024 2048/128:256}
source bench/gpu_install.sh && gpu_session "$R" session.log "data parallel; cases $CASES" \
  && gpu_install || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T0=$SECONDS
if [ "$PART" = a ]; then
JAX_PLATFORMS=cuda timeout -k 5 "${TEST_S:-300}" $PY -m pytest -q -rf --tb=short -p no:cacheprovider \
  tests/kernels/test_ragged_paged_attention.py \
  -k "not Interpret and ((table_tiles and float32) or page_sizes)" > "$R/pytest_f32_tiles.txt" 2>&1
echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -5 "$R/pytest_f32_tiles.txt"
$PY - > "$R/in.jsonl" <<'PY'
import json
for i, p in enumerate(["Hello, my name is", "The capital of France", "1 2 3 4", "Once upon a time",
                       "The quick brown fox", "In the beginning", "def main():", "Rain"]):
    print(json.dumps({"id": f"p{i}", "prompt": p, "max_tokens": 24, "temperature": 0}))
PY
for dp in 1 2; do
  timeout -s ABRT -k 5 120 $PY -m xlaserve generate --model builtin:tiny --dtype float32 \
    --data-parallel-size $dp --input "$R/in.jsonl" --output "$R/cli_dp$dp.jsonl" \
    > "$R/cli_dp$dp.log" 2>&1
  echo "=== cli dp$dp rc=$? at $((SECONDS - T0))s"; tail -2 "$R/cli_dp$dp.log"
done
$PY - "$R" <<'PY'
import json, sys
t = {dp: {json.loads(l)["id"]: json.loads(l)["token_ids"] for l in open(f"{sys.argv[1]}/cli_dp{dp}.jsonl")}
     for dp in (1, 2)}
print("CLI greedy token ids dp2 == dp1:", t[1] == t[2], "prompts", len(t[1]))
PY
else
for dp in 1 2; do
  timeout -s ABRT -k 5 "${BENCH_S:-250}" $PY bench/throughput.py --data-parallel-size $dp \
    --cases $CASES --compilation-cache-dir /tmp/xc --out "$R/throughput_dp$dp.json" \
    > "$R/throughput_dp$dp.log" 2>&1
  echo "=== throughput dp$dp rc=$? at $((SECONDS - T0))s"; tail -6 "$R/throughput_dp$dp.log"
done
$PY - "$R" <<'PY'
import json, sys
r = {dp: json.load(open(f"{sys.argv[1]}/throughput_dp{dp}.json")) for dp in (1, 2)}
for a, b in zip(r[1]["cases"], r[2]["cases"]):
    print(f"{a['case']:>10}: dp1 {a['output_tokens_per_s']:.0f} out tok/s, dp2 "
          f"{b['output_tokens_per_s']:.0f} ({b['output_tokens_per_s'] / a['output_tokens_per_s']:.2f}x)"
          f", dp2 of its roofline {b['fraction_of_roofline']}")
PY
fi
tar czf "$OUT/dp$PART.tgz" -C "$OUT" "dp$PART"
