#!/usr/bin/env bash
# Session 21 (issue 6): two ways to take the all-reduce kernel out of the tp=2 decode layer, both
# removed after losing (bench/results/session21_h200x2/README.md). The library code they ran
# exists only at the commits named, so check those out first (COMMIT=... records which):
#   verify (calls 1-2, commits e74d9df / ffa2645): o_proj / down_proj with the all-reduce and
#     the residual add in the GEMM's epilogue (pallas_kernels/gemm_all_reduce.py), the norm
#     applied by the next GEMM; its GPU tests, then the A/B (runs cand* / alt* / base*).
#     Candidate tiles of the two "all_reduce" table entries from TO (o_proj) and TD (down_proj):
#     bn/bk/warps/stages; a second table (ALT) from TO2 / TD2.
#   pallas (calls 3-4, commits 4140376 / 181535d): the fused all-reduce + add + RMSNorm as a
#     Pallas kernel (pallas_kernels/all_reduce_norm.py, tp_scaling --pallas-all-reduce) against
#     the PTX kernel: its GPU tests, then the A/B (runs pal* / base*, the committed table).
#   OUT=/tmp/out COMMIT=<hash> PART=verify|ab|pallas bash bench/run_gpu_s21.sh  (2 GPUs; .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 21 verify || exit 1
# write_cand CAND BASE [TO TD]: the committed table without "all_reduce" entries (BASE) and with
# candidate ones for the 8B o_proj / down_proj at tp=2 (CAND; tiles TO / TD, default $TO / $TD)
write_cand() {
  TO=${3:-${TO:-32/128/4/4}} TD=${4:-${TD:-32/256/4/4}} $PY - "$1" "$2" <<'PY'
import json, os, sys
t = json.load(open("pallas_kernels/skinny_gemm_tuning.json"))
t["entries"] = [e for e in t["entries"] if e.get("epilogue") != "all_reduce"]
json.dump(t, open(sys.argv[2], "w"), indent=1)
for name, k, tile in (("o_all_reduce_tp2", 2048, os.environ.get("TO", "32/128/4/4")),
                      ("down_all_reduce_tp2", 7168, os.environ.get("TD", "32/256/4/4"))):
    bn, bk, warps, stages = map(int, tile.split("/"))
    t["entries"].append({"name": name, "k": k, "n": 4096, "dtype": "bfloat16",
                         "epilogue": "all_reduce", "block_n": bn, "block_k": bk,
                         "num_splits": 1, "num_warps": warps, "num_stages": stages})
json.dump(t, open(sys.argv[1], "w"), indent=1)
PY
}
CAND=/tmp/cand_table.json; BASE=/tmp/base_table.json; write_cand $CAND $BASE
ALT=/tmp/alt_table.json; write_cand $ALT /tmp/base2.json ${TO2:-16/128/4/4} ${TD2:-16/256/4/4}
if [ "$PART" = pallas ]; then
  JAX_PLATFORMS=cuda timeout -s ABRT -k 5 240 $PY -m pytest -q -rfs --tb=short -x \
    -p no:cacheprovider tests/sharding/test_all_reduce.py tests/kernels/test_all_reduce_norm.py \
    -k "pallas or AllReduceNorm" > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -15 "$R/pytest_gpu.txt"
fi
if [ "$PART" = verify ]; then
  JAX_PLATFORMS=cuda timeout -s ABRT -k 5 240 $PY -m pytest -q -rfs --tb=short -x \
    -p no:cacheprovider tests/sharding/test_all_reduce.py tests/kernels/test_gemm_all_reduce.py \
    tests/kernels/test_skinny_gemm.py -k "gemm_all_reduce or GemmAllReduce or normed" \
    > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -15 "$R/pytest_gpu.txt"
fi
for r in ${RUNS:-cand2 base2 cand2b base2b base1 cand2_t}; do  # name: cand|alt|base + tp (+ tag)
  tp=${r//[!0-9]/}; tp=${tp:0:1}
  if [ $((SECONDS - T0)) -gt ${STOP_AT:-420} ]; then echo "=== $r skipped (time)"; continue; fi
  extra=(); [ "${r: -2}" = _t ] && extra=(--trace-dir /tmp/tr_$r --trace-steps 3)
  case ${r:0:3} in
    pal) run_tp $r $tp --pallas-all-reduce "${extra[@]}" ;;
    can) TBL=$CAND run_tp $r $tp "${extra[@]}" ;;
    alt) TBL=$ALT run_tp $r $tp "${extra[@]}" ;;
    *) if [ "$PART" = pallas ]; then run_tp $r $tp "${extra[@]}"; else TBL=$BASE run_tp $r $tp "${extra[@]}"; fi ;;
  esac
  [ "${r: -2}" = _t ] && trace_render "$R/$r.json"
done
grep -h -iE "greedy|all_reduce epilogue|gemm_all_reduce|all_reduce_add_rms_norm" "$R"/*.log | sort | uniq -c | head -20
tar czf "$OUT/s21_$PART.tgz" -C "$OUT" "s21_$PART" 2>/dev/null
