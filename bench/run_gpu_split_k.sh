#!/usr/bin/env bash
# One call on 2 GPUs (session 11): o_proj / down_proj as split-K partials summed in the fused
# all-reduce, and a forced GEMM tile. (Session 11's first call ran this script's predecessor,
# run_gpu_prefetch.sh at commit 7d500f7, for the L2-prefetch A/B: bench/results/session11_h200x2.)
#   1. tests/sharding/test_all_reduce.py compiled on the GPUs
#   2. bench/tp_scaling.py tp 1 2, decode B=1, the default plan: the baseline
#   3. tp 2 with --split-k for each of $SPLITS (the first one traced)
#   4. (FORCE_TILE set) tp 2 with one forced Triton GEMM tile for every dot, traced
#   5. (CLI set) the builtin model through `xlaserve generate` at tp 1 and 2: same greedy tokens?
#   OUT=/tmp/out bash bench/run_gpu_split_k.sh     (SPLITS="4 8"; BUDGET_S=480 stops early)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NCCL_NVLS_ENABLE=0
R=${OUT:?set OUT}/split_k
PY=${PYTHON:-python3}
SPLITS=${SPLITS:-4 8}
source bench/gpu_install.sh && gpu_session "$R" session.log "split-K partials in the fused all-reduce" \
  && gpu_install || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T0=$SECONDS
left() { [ $((SECONDS - T0)) -lt "${BUDGET_S:-480}" ]; }
JAX_PLATFORMS=cuda timeout -k 5 "${TEST_S:-150}" $PY -m pytest -q -rfs --tb=short \
  -p no:cacheprovider tests/sharding/test_all_reduce.py > "$R/pytest_all_reduce.txt" 2>&1
echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -3 "$R/pytest_all_reduce.txt"
TPS=(--decode-batches 1 --all-reduce custom --no-prefill --greedy-steps 4 --child-timeout 200)
timeout -s ABRT -k 5 300 $PY bench/tp_scaling.py --tp 1 2 "${TPS[@]}" --out "$R/tp_base.json" \
  > "$R/tp_base.log" 2>&1
echo "=== base rc=$? at $((SECONDS - T0))s"; grep -E "decode B=1" "$R/tp_base.log" | head -4
first=1
for k in $SPLITS; do
  left || { echo "=== skip split-K $k (time)"; continue; }
  trace=(); [ -n "$first" ] && trace=(--trace-dir /tmp/tr_k$k --trace-steps 3); first=
  timeout -s ABRT -k 5 200 $PY bench/tp_scaling.py --tp 2 "${TPS[@]}" --split-k "$k" \
    "${trace[@]}" --out "$R/tp2_k$k.json" > "$R/tp2_k$k.log" 2>&1
  echo "=== split-K $k rc=$? at $((SECONDS - T0))s"; grep -E "decode B=1" "$R/tp2_k$k.log" | head -2
done
if [ -n "${FORCE_TILE:-}" ] && left; then
  timeout -s ABRT -k 5 200 $PY bench/tp_scaling.py --tp 2 "${TPS[@]}" \
    --xla-flags="--xla_gpu_override_gemm_autotuner=$FORCE_TILE" --compilation-cache-dir none \
    --trace-dir /tmp/tr_tile --trace-steps 3 --out "$R/tp2_tile.json" > "$R/tp2_tile.log" 2>&1
  echo "=== forced tile rc=$? at $((SECONDS - T0))s"; grep -E "decode B=1" "$R/tp2_tile.log" | head -2
fi
if [ -n "${CLI:-}" ] && left; then  # the builtin model through the CLI: tp 2 == tp 1 greedy?
  gpu_cli_tp_check "$R"
fi
$PY - "$R" <<'PY' | tee "$R/summary.txt"
import glob, json, os, sys
r = sys.argv[1]
base = json.load(open(f"{r}/tp_base.json"))
by = {x["tp"]: x for x in base["results"]}
t1 = by[1]["decode"]["1"]["step_ms"]
print(f"tp1 {t1} ms; tp2 base {by[2]['decode']['1']['step_ms']} ms "
      f"({t1 / by[2]['decode']['1']['step_ms']:.3f}x)")
for f in sorted(glob.glob(f"{r}/tp2_*.json")):
    x = json.load(open(f))["results"][0]
    ms = x["decode"]["1"]["step_ms"]
    same = x["greedy_tokens"] == by[1]["greedy_tokens"]
    same2 = x["greedy_tokens"] == by[2]["greedy_tokens"]
    print(f"{os.path.basename(f)}: {ms} ms ({t1 / ms:.3f}x vs tp1), split_k "
          f"{x.get('split_k')}, greedy == tp1: {same}, == tp2 base: {same2} "
          f"(tp1 gaps {[round(g, 3) for g in by[1]['greedy_gap']]})")
PY
