#!/usr/bin/env bash
# Session 22 (issue 6): where the tp=2 decode step's device idle time lies.
#   probe: tp=1 and tp=2 (the library) with the steady-state slope (--slope-iters) beside the
#     usual 20-step runs; traced runs (6 steps) whose summaries list the idle time between each
#     pair of kernels; the replicated input embedding (sessions 13/15: 80-125 us slower, never
#     traced) traced too.
#   attn: batch-1 attention tiles and KV splits inside the model (session 14 chose them in
#     isolation, where the kernel took 6.5 us against 9.0 in the model): tables written by
#     bench/attention_table_variant.py, runs named <variant><tp>, each with the slope and a short
#     trace (the attention kernel's time per layer). Variants: base (the committed table),
#     mb2 / mb1 (the split rule's min_blocks_per_split 2 / 1: 8 / 12 splits at tp=2), st2 (2
#     pipeline stages), mb1p4 (mb1 with 64-key blocks).
#   attn2: the same at both tps, in A/B/A/B order, runs named <variant>_<tp>[b]; more variants:
#     mb1p2 (32-key blocks), t768p4 (mb1p4 with the split rule's target_programs 768: 24 / 12
#     splits at tp 2 / 1).
#   verify: the committed table (small_decode) on the GPUs: the attention kernel tests compiled,
#     tp 1 and 2 in one tp_scaling run (greedy tokens compared), the builtin model's greedy
#     tokens through the CLI at tp 1 and 2.
#   Every variant is built without the table's small_decode section (added after these runs;
#   "base" is the table they ran against).
#   OUT=/tmp/out PART=probe|attn|attn2|verify bash bench/run_gpu_s22.sh  (2 GPUs; carry .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 22 probe || exit 1
if [ "$PART" = verify ]; then
  JAX_PLATFORMS=cuda timeout -s ABRT -k 5 200 $PY -m pytest -q -rfs --tb=short -x \
    -p no:cacheprovider tests/kernels/test_ragged_paged_attention.py \
    tests/kernels/test_tuning_rules.py > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -4 "$R/pytest_gpu.txt"
  run_tp new12 "1 2" --slope-iters ${SLOPE:-80}
  grep -E '"(greedy_equal_tp2|decode_b1_speedup_tp2|meets_1p6x_decode_b1_tp2)"' "$R/new12.log"
  gpu_cli_tp_check "$R"
  tar czf "$OUT/s22_$PART.tgz" -C "$OUT" "s22_$PART" 2>/dev/null
  exit 0
fi
if [ "$PART" = attn2 ]; then
  V="bench/attention_table_variant.py --no-small-decode"
  $PY $V --out /tmp/at_base.json && $PY $V --min-blocks 1 --set pages_per_block=4 \
    --out /tmp/at_mb1p4.json && $PY $V --min-blocks 1 --set pages_per_block=2 \
    --out /tmp/at_mb1p2.json && $PY $V --min-blocks 1 --target-programs 768 \
    --set pages_per_block=4 --out /tmp/at_t768p4.json || exit 1
  for r in ${RUNS:-base_2 mb1p4_2 t768p4_2 mb1p2_2 base_2b mb1p4_2b base_1 mb1p4_1 t768p4_1 base_1b mb1p4_1b}; do
    if [ $((SECONDS - T0)) -gt ${STOP_AT:-500} ]; then echo "=== $r skipped (time)"; continue; fi
    v=${r%_*}; tp=${r##*_}; tp=${tp:0:1}
    ATBL=/tmp/at_$v.json run_tp $r $tp --slope-iters ${SLOPE:-80}
  done
  tar czf "$OUT/s22_$PART.tgz" -C "$OUT" "s22_$PART" 2>/dev/null
  exit 0
fi
if [ "$PART" = attn ]; then
  V="bench/attention_table_variant.py --no-small-decode"
  $PY $V --out /tmp/at_base.json && $PY $V --min-blocks 2 --out /tmp/at_mb2.json \
    && $PY $V --min-blocks 1 --out /tmp/at_mb1.json && $PY $V --set num_stages=2 --out /tmp/at_st2.json \
    && $PY $V --min-blocks 1 --set pages_per_block=4 --out /tmp/at_mb1p4.json || exit 1
  for r in ${RUNS:-base2 mb12 mb22 st22 mb1p42 base2b}; do
    if [ $((SECONDS - T0)) -gt ${STOP_AT:-460} ]; then echo "=== $r skipped (time)"; continue; fi
    v=${r%?}; v=${v%b}; tp=${r: -1}; [ "${r: -1}" = b ] && { v=${r%??}; tp=${r: -2:1}; }
    ATBL=/tmp/at_$v.json run_tp $r $tp --slope-iters ${SLOPE:-80} --trace-dir /tmp/tr_$r \
      --trace-steps 3
    trace_render "$R/$r.json" 16 | grep -E "^-- /device|ragged_paged|loop_convert|gaps/step" | head -12
  done
  tar czf "$OUT/s22_$PART.tgz" -C "$OUT" "s22_$PART" 2>/dev/null
  exit 0
fi
for r in ${RUNS:-base2 base1 base2b rep2 base2_t base1_t rep2_t}; do  # base|rep + tp (+ tag)
  tp=${r//[!0-9]/}; tp=${tp:0:1}
  if [ $((SECONDS - T0)) -gt ${STOP_AT:-460} ]; then echo "=== $r skipped (time)"; continue; fi
  extra=(--slope-iters ${SLOPE:-80})
  [ "${r: -2}" = _t ] && extra=(--trace-dir /tmp/tr_$r --trace-steps ${TRACE_STEPS:-6})
  case ${r:0:3} in
    rep) run_tp $r $tp --replicate-embedding "${extra[@]}" ;;
    *) run_tp $r $tp "${extra[@]}" ;;
  esac
  [ "${r: -2}" = _t ] && trace_render "$R/$r.json" 16
done
tar czf "$OUT/s22_$PART.tgz" -C "$OUT" "s22_$PART" 2>/dev/null
