#!/usr/bin/env bash
# Session 24 (issue 6): the batch-1 attention launch (pallas_kernels/ragged_paged_attention.py).
# The decode step's attention grid is (items, KV heads, splits) = (13, 4, 12) at tp=2 for one
# sequence in the T16 S8 bucket: 624 programs of which 48 have keys, 192 store zero partials for
# the 15 padding rows and the rest are empty, launched in that order (items fastest).
#   grid: the compiled attention tests of the two fields; then tp 2 and 1 with table variants
#     (bench/attention_table_variant.py): base (the committed table), wo (work_outer: the items
#     on the slowest grid axis, so the real programs launch first), wosp (work_outer and
#     skip_padding: no programs for the padding rows, the combine zeroes them); runs
#     <variant>_<tp>[b][_t], A/B/A/B, the steady-state slope; _t traced.
#     Ran at commit 91cf2bc; both fields lost and were removed after (bench/results/
#     session24_h200x2/README.md), so this part needs that commit.
#   check: the compiled kernel and sharding tests on the 2 GPUs (330 s at most), then the
#     builtin model through `xlaserve generate` at tp 1 and 2 (greedy token ids equal).
#   OUT=/tmp/out PART=grid|check COMMIT=<hash> bash bench/run_gpu_s24.sh  (2 GPUs; carry .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 24 grid || exit 1
if [ "$PART" = grid ]; then
  GPU_TESTS_K="not Interpret and (wo or qt or long_decode or padded)" \
    gpu_tests tests/kernels/test_ragged_paged_attention.py
  $PY bench/attention_table_variant.py --set work_outer=true --out /tmp/at_wo.json || exit 1
  $PY bench/attention_table_variant.py --set work_outer=true --set skip_padding=true \
    --out /tmp/at_wosp.json || exit 1
  at_of() { case $1 in wo) echo /tmp/at_wo.json ;; wosp) echo /tmp/at_wosp.json ;; esac; }
  run_variants "base_2 wosp_2 wo_2 base_2b wosp_2b wo_2b base_1 wosp_1 wo_1 base_1b wosp_1b wosp_2_t base_2_t" 500
  exit 0
fi
if [ "$PART" = check ]; then
  GPU_TESTS_TIMEOUT=330 gpu_tests tests/kernels tests/sharding
  gpu_cli_tp_check "$R"
  pack_results
  exit 0
fi
echo "unknown PART=$PART"; exit 2
