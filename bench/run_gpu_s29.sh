#!/usr/bin/env bash
# Session 29 (issue 6): the batch-1 decode step at tp=2 against tp=1 on 2 x H200
# (bench/results/session29_h200x2/README.md).
#   a: where the ratio's host spread comes from, and one per-tp setting. Runs <variant>_<tp>[b|c]
#     (the steady-state slope), in rotation: base_1 (tp=1 on the first GPU), g1_1 (tp=1 on the
#     second GPU: CUDA_VISIBLE_DEVICES=1), base_2 (tp=2), el_2 (tp=2 with every PDL trigger
#     family: XLASERVE_EARLY_LAUNCH=1). run_tp samples each GPU's clocks during every run.
#   b: the same A/B on the warm host of part a: base_2 / el_2 alternated six times, then
#     base_1 / el_1 twice (the triggers at tp=1).
#   r: the ratio on the default: tp=1 and tp=2 alternated three times, then a traced run at
#     each tp (per-kernel times per step).
#   c: batch-1 attention's KV splits at tp=2 (small_decode max_splits; ctx 1025 has 17 64-key
#     blocks): sp9 (9 splits of 2 blocks, as the default 12 gives, but no empty splits and 25%
#     fewer partials for the combine: does XLA then make one combine fusion, as at tp=1's 6?),
#     sp6 (6 splits of 3 blocks): runs base/sp9/sp6 alternated at tp=2, then a traced sp9.
#   d (written at the end of session 29, not yet run): sp6 at tp=2 traced first (does XLA make
#     one combine fusion at 6 splits, as at tp=1?), then base/sp6 alternated four times.
#   OUT=/tmp/out PART=a|b|r|c|d bash bench/run_gpu_s29.sh  (2 GPUs; carry .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 29 a || exit 1
# Variants: g1 (tp=1 on the second GPU), el (every PDL trigger family), spN (the attention
# table with small_decode max_splits N, written on first use); base is the default.
env_of() { case $1 in
  g1) echo CUDA_VISIBLE_DEVICES=1 ;;
  el) echo XLASERVE_EARLY_LAUNCH=1 ;; esac; }
at_of() {
  case $1 in sp*) [ -f "/tmp/at_$1.json" ] || $PY bench/attention_table_variant.py \
    --small-set "max_splits=${1#sp}" --out "/tmp/at_$1.json" >&2; echo "/tmp/at_$1.json" ;; esac; }
case $PART in
  a) run_variants "base_1 base_2 g1_1 el_2 base_1b g1_1b base_2b el_2b base_1c g1_1c base_2c el_2c base_1d g1_1d base_2d el_2d" 500 ;;
  b) run_variants "base_2 el_2 base_2b el_2b base_2c el_2c base_2d el_2d base_2e el_2e base_2f el_2f base_1 el_1 base_1b el_1b" 330 ;;
  r) run_variants "base_1 base_2 base_1b base_2b base_1c base_2c base_2_t base_1_t" 420 ;;
  c) run_variants "sp9_2 base_2 sp6_2 sp9_2b base_2b sp6_2b sp9_2_t sp9_2c base_2c" 400 ;;
  d) run_variants "sp6_2_t base_2 sp6_2 base_2b sp6_2b base_2c sp6_2c base_2d sp6_2d" 480 ;;
  *) echo "unknown PART=$PART"; exit 2 ;;
esac
pack_results
