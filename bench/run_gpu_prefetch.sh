#!/usr/bin/env bash
# One call on 2 GPUs: the fused all-reduce's L2 prefetch of the next GEMM's weights (session 11).
#   1. tests/sharding/test_all_reduce.py compiled on the GPUs (incl. prefetch bit-equality)
#   2. bench/tp_scaling.py tp 1 2, decode B=1, the default plan (no prefetch): the baseline
#   3. tp 2 with --prefetch-mb for each of $PF (the first one traced), same process settings
#   4. (FORCE_TILE set) tp 2 with one forced Triton GEMM tile for every dot, traced
#   OUT=/tmp/out bash bench/run_gpu_prefetch.sh        (PF="24 48"; BUDGET_S=480 stops early)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NCCL_NVLS_ENABLE=0
R=${OUT:?set OUT}/prefetch
PY=${PYTHON:-python3}
PF=${PF:-24 48}
source bench/gpu_install.sh && gpu_session "$R" session.log "L2 prefetch in the fused all-reduce" \
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
for mb in $PF; do
  left || { echo "=== skip prefetch $mb (time)"; continue; }
  trace=(); [ -n "$first" ] && trace=(--trace-dir /tmp/tr_pf$mb --trace-steps 3); first=
  timeout -s ABRT -k 5 200 $PY bench/tp_scaling.py --tp 2 "${TPS[@]}" --prefetch-mb "$mb" \
    "${trace[@]}" --out "$R/tp2_pf$mb.json" > "$R/tp2_pf$mb.log" 2>&1
  echo "=== prefetch $mb MiB rc=$? at $((SECONDS - T0))s"; grep -E "decode B=1" "$R/tp2_pf$mb.log" | head -2
done
if [ -n "${FORCE_TILE:-}" ] && left; then
  timeout -s ABRT -k 5 200 $PY bench/tp_scaling.py --tp 2 "${TPS[@]}" \
    --xla-flags "--xla_gpu_override_gemm_autotuner=$FORCE_TILE" --compilation-cache-dir none \
    --trace-dir /tmp/tr_tile --trace-steps 3 --out "$R/tp2_tile.json" > "$R/tp2_tile.log" 2>&1
  echo "=== forced tile rc=$? at $((SECONDS - T0))s"; grep -E "decode B=1" "$R/tp2_tile.log" | head -2
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
    print(f"{os.path.basename(f)}: {ms} ms ({t1 / ms:.3f}x vs tp1), prefetch_bytes "
          f"{x.get('prefetch_bytes')}, greedy == tp1: {same} "
          f"(tp1 gaps {[round(g, 3) for g in by[1]['greedy_gap']]})")
PY
