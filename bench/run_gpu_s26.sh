#!/usr/bin/env bash
# Session 26 (issue 6): the KV-split combine as one variadic reduce, how much of the batch-1
# decode step lies outside the layers, and the weights streamed with an L2 eviction policy. Both
# library variants lost or changed nothing and were removed: part a needs commit 817a4a0, part b
# commit 8c3041d (bench/results/session26_h200x2/README.md).
#   a: the compiled combine tests of combine="reduce"; then runs <variant>_<tp>[b][_t] (the
#     steady-state slope; _t traced): base (the committed defaults), rd (table entry "combine":
#     "reduce", written by bench/attention_table_variant.py), rd17 (rd with the small_decode
#     section's max_splits 17: one 64-key block per split at ctx 1025), n16 (base with 16
#     layers instead of 32: the step's per-layer time and the rest, by difference).
#   b: the decode GEMMs' weight tiles read with an L2 eviction policy (XLASERVE_WEIGHT_EVICT,
#     pallas_kernels/skinny_gemm.py), so the small data of the latency-bound kernels (the
#     all-reduce's rank and counters, attention's work list and page table, rope's tables, the
#     residual, the norm scales) may stay in L2: the compiled skinny GEMM tests with it, then
#     runs base / ef (evict_first) at both tps, A/B/A/B, and a traced ef run.
#   c: batch-1 attention's launch settings in the table's 8B decode entry (written by
#     bench/attention_table_variant.py): runs base, kg0 (key_gather false: one page id per
#     page), w2 / w8 (num_warps 2 / 8), tp=2 A/B then tp=1.
#   OUT=/tmp/out PART=a|b|c bash bench/run_gpu_s26.sh  (2 GPUs; carry .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 26 a || exit 1
if [ "$PART" = a ]; then
  GPU_TESTS_K="not Interpret and combine" gpu_tests tests/kernels/test_combine_splits.py
  $PY bench/attention_table_variant.py --set combine='"reduce"' --out /tmp/at_rd.json || exit 1
  $PY bench/attention_table_variant.py --set combine='"reduce"' --small-set max_splits=17 \
    --out /tmp/at_rd17.json || exit 1
  at_of() { case $1 in rd) echo /tmp/at_rd.json ;; rd17) echo /tmp/at_rd17.json ;; esac; }
  args_of() { [ "$1" = n16 ] && echo --num-layers 16; }
  run_variants "base_2 rd_2 rd17_2 n16_2 base_2b rd_2b rd17_2b base_1 rd_1 n16_1 base_1b rd_1b rd17_1 rd_2_t" 540
  exit 0
fi
if [ "$PART" = b ]; then
  XLASERVE_WEIGHT_EVICT=evict_first GPU_TESTS_TIMEOUT=90 gpu_tests tests/kernels/test_skinny_gemm.py
  env_of() { [ "$1" = ef ] && echo XLASERVE_WEIGHT_EVICT=evict_first; }
  run_variants "base_2 ef_2 base_2b ef_2b base_1 ef_1 base_1b ef_1b ef_2c base_2c ef_2_t" 470
  exit 0
fi
if [ "$PART" = c ]; then
  for v in "kg0 key_gather=false" "w2 num_warps=2" "w8 num_warps=8"; do
    set -- $v
    $PY bench/attention_table_variant.py --set "$2" --out "/tmp/at_$1.json" || exit 1
  done
  at_of() { [ "$1" != base ] && echo "/tmp/at_$1.json"; }
  run_variants "base_2 kg0_2 w2_2 w8_2 base_2b kg0_2b w2_2b w8_2b base_1 kg0_1 w2_1 w8_1" 330
  exit 0
fi
echo "unknown PART=$PART"; exit 2
